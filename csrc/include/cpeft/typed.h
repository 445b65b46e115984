#define CPEFT_CAT_(a, b) a##_##b
#define CPEFT_CAT(a, b) CPEFT_CAT_(a, b)
#define CPEFT_TYPED(name) CPEFT_CAT(name, SUFFIX)
