# Hints that let find_package(Torch) succeed with a CUDA build of torch: included by
# CMakeLists.txt before find_package(Torch), and installed next to resgeom_fastConfig.cmake, which
# includes it before find_dependency(Torch). Reads CUDAToolkit_ROOT (the toolkit folder, found by
# tools/cuda_home.py in CMakeLists.txt) and CMAKE_PREFIX_PATH (torch's cmake folder).
# With a CUDA build of torch, find_package(Torch) runs FindCUDA and enable_language(CUDA) itself,
# whatever RESGEOM_FAST_CUDA says: hand it the real toolkit (not a wrapper script on PATH).
if(DEFINED CUDAToolkit_ROOT)
  if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
    set(CUDA_TOOLKIT_ROOT_DIR "${CUDAToolkit_ROOT}")
  endif()
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND EXISTS "${CUDAToolkit_ROOT}/bin/nvcc")
    set(CMAKE_CUDA_COMPILER "${CUDAToolkit_ROOT}/bin/nvcc")
  endif()
endif()
# The architectures setup.py targets by default; torch's cmake turns TORCH_CUDA_ARCH_LIST into
# -gencode flags (and ignores, with a warning, CMAKE_CUDA_ARCHITECTURES).
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0+PTX")
endif()
# torch links NVRTC; a minimal toolkit may lack it while the pip wheels of torch ship it
# (site-packages/nvidia/cu13/lib for CUDA 13, nvidia/cuda_nvrtc/lib for CUDA 12).
if(NOT CUDA_nvrtc_LIBRARY)
  set(_rg_nvrtc_hints "${CUDAToolkit_ROOT}/lib64" "${CUDAToolkit_ROOT}/lib")
  foreach(_p IN LISTS CMAKE_PREFIX_PATH)
    list(APPEND _rg_nvrtc_hints "${_p}/../../../nvidia/cu13/lib"
         "${_p}/../../../nvidia/cuda_nvrtc/lib")
  endforeach()
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
               HINTS ${_rg_nvrtc_hints} NO_DEFAULT_PATH)
endif()
