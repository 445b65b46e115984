/* cpeft_fail (core.h): record a failure code and its message in a caller-owned status. */
#include "cpeft/core.h"

#include <stdarg.h>
#include <stdio.h>

int cpeft_fail(cpeft_status *st, int code, const char *fmt, ...)
{
    st->code = code;
    va_list args;
    va_start(args, fmt);
    /* vsnprintf truncates to the fixed buffer; a cut message is better than none. */
    vsnprintf(st->message, sizeof st->message, fmt, args);
    va_end(args);
    return code;
}
