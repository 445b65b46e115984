/* cpeft_lora_groups (cpeft/lora_linear.h): the grouping rule of a LoRA linear, both backends. */
#include "cpeft/lora_linear.h"

int cpeft_lora_groups(const cpeft_lora_linear_args *a, int64_t *seg, int64_t *enabled_count,
                      cpeft_status *st)
{
    if (a->groups < 1 || a->groups > CPEFT_MAX_GROUPS || a->out % a->groups != 0)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "lora_linear: groups must be in [1, %d] and divide out=%lld, got %lld",
                          CPEFT_MAX_GROUPS, (long long)a->out, (long long)a->groups);
    int64_t k = 0;
    for (int64_t g = 0; g < a->groups; ++g)
        k += a->enabled[g] != 0;
    *seg = a->out / a->groups;
    *enabled_count = k;
    if (a->lora_a.rows != a->r * k || a->lora_a.cols != a->in || a->lora_b.rows != *seg * k ||
        a->lora_b.cols != a->r)
        return cpeft_fail(st, CPEFT_ERR_INTERNAL,
                          "lora_linear: with r=%lld and %lld enabled blocks of %lld rows expected "
                          "lora_a %lld x %lld and lora_b %lld x %lld, got %lld x %lld and "
                          "%lld x %lld",
                          (long long)a->r, (long long)k, (long long)*seg, (long long)(a->r * k),
                          (long long)a->in, (long long)(*seg * k), (long long)a->r,
                          (long long)a->lora_a.rows, (long long)a->lora_a.cols,
                          (long long)a->lora_b.rows, (long long)a->lora_b.cols);
    return CPEFT_OK;
}
