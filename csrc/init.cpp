// The Python module resgeom_fast._C. Importing it runs the static TORCH_LIBRARY registrations
// of every op file linked into this library; the module itself holds no functions: the ops are
// reached through torch.ops.resgeom_fast.* (wrapped by resgeom_fast.ops).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Compiled kernels of resgeom_fast (registered with the PyTorch dispatcher).",
      -1,    // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
