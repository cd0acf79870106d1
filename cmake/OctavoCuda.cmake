# Decides whether the CUDA backend is built.
#   OCTAVO_CUDA=OFF  : never.
#   OCTAVO_CUDA=AUTO : when both nvcc and cuBLAS(Lt) are found; the log says which was missing.
#   OCTAVO_CUDA=ON   : required; a missing nvcc or cuBLAS stops the configure with the reason.
# cuBLAS is looked for in the CUDA toolkit first, then in the nvidia-cublas wheel of the Python
# that runs the build (pip's isolated build environment hides it, so the base interpreter's
# site-packages are searched too).
# Outputs: OCTAVO_WITH_CUDA, OCTAVO_CUBLASLT_LIBRARY, OCTAVO_CUBLAS_INCLUDE_DIR,
#          OCTAVO_CUBLAS_LIBRARY_DIR.

set(OCTAVO_WITH_CUDA OFF)
if(OCTAVO_CUDA STREQUAL "OFF")
  message(STATUS "octavo: CUDA backend off (OCTAVO_CUDA=OFF)")
  return()
endif()

function(_octavo_cuda_unavailable reason)
  if(OCTAVO_CUDA STREQUAL "ON")
    message(FATAL_ERROR "octavo: OCTAVO_CUDA=ON but ${reason}")
  endif()
  message(STATUS "octavo: CUDA backend not built: ${reason} (OCTAVO_CUDA=AUTO)")
endfunction()

include(CheckLanguage)
if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
  # check_language only looks on PATH; the toolkit's usual home is not always there.
  foreach(candidate /usr/local/cuda/bin/nvcc /opt/cuda/bin/nvcc)
    if(EXISTS ${candidate})
      set(CMAKE_CUDA_COMPILER ${candidate} CACHE FILEPATH "CUDA compiler")
      break()
    endif()
  endforeach()
endif()
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  _octavo_cuda_unavailable("nvcc was not found (put it on PATH or set CUDACXX)")
  return()
endif()

get_filename_component(_octavo_nvcc_bin "${CMAKE_CUDA_COMPILER}" DIRECTORY)
if(NOT CUDAToolkit_ROOT)
  get_filename_component(CUDAToolkit_ROOT "${_octavo_nvcc_bin}/.." REALPATH)
endif()
find_package(CUDAToolkit QUIET)
if(NOT CUDAToolkit_FOUND)
  _octavo_cuda_unavailable("nvcc was found at ${CMAKE_CUDA_COMPILER} but not the CUDA toolkit (runtime headers and libraries)")
  return()
endif()

set(_octavo_cublas_hints ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_TARGET_DIR}/lib64)
set(_octavo_cublas_include_hints ${CUDAToolkit_INCLUDE_DIRS})
find_package(Python COMPONENTS Interpreter QUIET)
if(Python_EXECUTABLE)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -I -c
      "import site, sysconfig; print(';'.join([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'], *site.getsitepackages()]))"
    OUTPUT_VARIABLE _octavo_site_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  foreach(site_dir ${_octavo_site_dirs})
    foreach(sub cu13 cublas cu12)
      list(APPEND _octavo_cublas_hints ${site_dir}/nvidia/${sub}/lib)
      list(APPEND _octavo_cublas_include_hints ${site_dir}/nvidia/${sub}/include)
    endforeach()
  endforeach()
endif()

find_path(OCTAVO_CUBLAS_INCLUDE_DIR cublasLt.h HINTS ${_octavo_cublas_include_hints})
find_library(OCTAVO_CUBLASLT_LIBRARY NAMES cublasLt libcublasLt.so.13 libcublasLt.so.12
  HINTS ${_octavo_cublas_hints})
if(NOT OCTAVO_CUBLAS_INCLUDE_DIR OR NOT OCTAVO_CUBLASLT_LIBRARY)
  _octavo_cuda_unavailable("cuBLASLt was not found in the CUDA toolkit (${CUDAToolkit_LIBRARY_DIR}) nor in an nvidia-cublas wheel (pip install nvidia-cublas)")
  return()
endif()
get_filename_component(OCTAVO_CUBLAS_LIBRARY_DIR "${OCTAVO_CUBLASLT_LIBRARY}" DIRECTORY)

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  # Ampere (A100) and Hopper with its architecture-specific instructions (wgmma, setmaxnreg).
  set(CMAKE_CUDA_ARCHITECTURES "80;90a")
endif()
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(OCTAVO_WITH_CUDA ON)
message(STATUS "octavo: CUDA backend on: nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES}, cuBLASLt ${OCTAVO_CUBLASLT_LIBRARY}")
