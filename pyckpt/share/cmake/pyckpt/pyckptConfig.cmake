# find_package(pyckpt) next to find_package(Torch), with
#   cmake -DCMAKE_PREFIX_PATH="$(python -c 'import torch, pyckpt; print(torch.utils.cmake_prefix_path + ";" + pyckpt.cmake_prefix_path())')"
# defines the imported target pyckpt::pyckpt: the C++ API's library and its header
# (#include <pyckpt/pyckpt.h>). Link it together with ${TORCH_LIBRARIES}.
get_filename_component(_pyckpt_package "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
file(GLOB _pyckpt_library "${_pyckpt_package}/_api*.so")
if(NOT _pyckpt_library)
  set(pyckpt_FOUND FALSE)
  set(pyckpt_NOT_FOUND_MESSAGE "pyckpt's C++ library (_api*.so) is not in ${_pyckpt_package}: the package was installed without its extensions")
  return()
endif()
list(GET _pyckpt_library 0 _pyckpt_library)
if(NOT TARGET pyckpt::pyckpt)
  add_library(pyckpt::pyckpt SHARED IMPORTED)
  set_target_properties(pyckpt::pyckpt PROPERTIES
    IMPORTED_LOCATION "${_pyckpt_library}"
    INTERFACE_INCLUDE_DIRECTORIES "${_pyckpt_package}/include")
endif()
set(pyckpt_LIBRARY "${_pyckpt_library}")
set(pyckpt_INCLUDE_DIR "${_pyckpt_package}/include")
set(pyckpt_FOUND TRUE)
