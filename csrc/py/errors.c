/*
 * Exceptions at the boundary: a compute function's cpeft_status becomes the matching Python
 * exception here and nowhere else (see cpeft_code in core.h), and a producer's own export error is
 * re-raised with the argument's name so the caller can tell which tensor failed.
 */
#include "boundary.h"

#include <stdarg.h>

int cpeft_raise_status(const cpeft_state *state, const cpeft_status *st)
{
    const char *message = st->message[0] ? st->message : "no detail reported";
    switch (st->code) {
    case CPEFT_ERR_NOMEM: PyErr_Format(PyExc_MemoryError, "cpeft: %s", message); break;
    case CPEFT_ERR_INDEX: PyErr_Format(PyExc_IndexError, "%s", message); break;
    case CPEFT_ERR_CUDA:
    case CPEFT_ERR_CUBLAS: PyErr_Format(state->CudaError, "%s", message); break;
    case CPEFT_ERR_UNSUPPORTED:
    case CPEFT_ERR_CHANGED: PyErr_Format(PyExc_RuntimeError, "%s", message); break;
    default:
        PyErr_Format(PyExc_RuntimeError, "cpeft internal error (status %d): %s", st->code, message);
        break;
    }
    return -1;
}

/* The pending exception as a normalized instance (new reference), the error indicator cleared. */
static PyObject *take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

static void restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

void cpeft_reraise_with_context(PyObject *type, const char *fmt, ...)
{
    /* Interrupts and memory errors are not export problems: let them through untouched. */
    if (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(PyExc_MemoryError)) {
        return;
    }
    PyObject *cause = take_exception();
    va_list va;
    va_start(va, fmt);
    PyObject *context = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (context == NULL || cause == NULL) {
        Py_XDECREF(context);
        Py_XDECREF(cause);
        return;
    }
    PyErr_Format(type, "%U: %S", context, cause);
    Py_DECREF(context);
    PyObject *raised = take_exception();
    if (raised == NULL) {
        Py_DECREF(cause);
        return;
    }
    PyException_SetCause(raised, cause);   /* steals the reference to cause */
    restore_exception(raised);             /* steals the reference to raised */
}
