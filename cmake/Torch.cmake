# Locates the libtorch that ships inside the Python environment's torch package and exposes it as
# imported targets. Done by hand instead of find_package(Torch) so a CPU-only machine with a CUDA
# build of torch configures without hunting for cuDNN and friends.
find_package(Python REQUIRED COMPONENTS Interpreter)
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)"
  OUTPUT_VARIABLE _modnorm_torch_info
  RESULT_VARIABLE _modnorm_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _modnorm_torch_rc EQUAL 0)
  message(FATAL_ERROR "modnorm: cannot import torch with ${Python_EXECUTABLE}; install torch first "
                      "and build with `pip install --no-build-isolation .`")
endif()
string(REPLACE "\n" ";" _modnorm_torch_info "${_modnorm_torch_info}")
list(GET _modnorm_torch_info 0 MODNORM_TORCH_DIR)
list(GET _modnorm_torch_info 1 MODNORM_TORCH_CXX11_ABI)
list(GET _modnorm_torch_info 2 MODNORM_TORCH_VERSION)
message(STATUS "modnorm: torch ${MODNORM_TORCH_VERSION} at ${MODNORM_TORCH_DIR}")

add_library(modnorm::torch INTERFACE IMPORTED)
target_include_directories(modnorm::torch SYSTEM INTERFACE
  "${MODNORM_TORCH_DIR}/include" "${MODNORM_TORCH_DIR}/include/torch/csrc/api/include")
target_link_libraries(modnorm::torch INTERFACE
  "${MODNORM_TORCH_DIR}/lib/libtorch.so" "${MODNORM_TORCH_DIR}/lib/libtorch_cpu.so"
  "${MODNORM_TORCH_DIR}/lib/libc10.so")
target_compile_definitions(modnorm::torch INTERFACE
  _GLIBCXX_USE_CXX11_ABI=${MODNORM_TORCH_CXX11_ABI} TORCH_API_INCLUDE_EXTENSION_H)
# The core passes std::string across its API: it must share torch's C++ ABI.
target_compile_definitions(modnorm_core PUBLIC _GLIBCXX_USE_CXX11_ABI=${MODNORM_TORCH_CXX11_ABI})

if(MODNORM_WITH_CUDA)
  add_library(modnorm::torch_cuda INTERFACE IMPORTED)
  target_link_libraries(modnorm::torch_cuda INTERFACE
    "${MODNORM_TORCH_DIR}/lib/libtorch_cuda.so" "${MODNORM_TORCH_DIR}/lib/libc10_cuda.so" CUDA::cudart)
  target_compile_definitions(modnorm::torch_cuda INTERFACE MODNORM_TORCH_CUDA)
endif()
