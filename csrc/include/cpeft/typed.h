/*
 * Names for the loop templates of csrc/cpu/<name>_loops.inc. A template is written once with
 * element type T and included once per dtype with T and SUFFIX defined around the inclusion;
 * CPEFT_TYPED(store) with SUFFIX f32 names the function store_f32.
 */
#ifndef CPEFT_TYPED_H
#define CPEFT_TYPED_H

#define CPEFT_CAT_(a, b) a##_##b
#define CPEFT_CAT(a, b) CPEFT_CAT_(a, b)
#define CPEFT_TYPED(name) CPEFT_CAT(name, SUFFIX)

#endif /* CPEFT_TYPED_H */
