# Finds NCCL for Coil's GPU collectives (dist/comm_nccl.cpp), in this order, and says which it took:
#   1. COIL_NCCL_ROOT (or the NCCL_ROOT / NCCL_HOME environment variables), when given;
#   2. the CUDA Toolkit (some images copy NCCL into it);
#   3. the `nvidia-nccl` wheel of the venv whose torch provides LibTorch (COIL_PYTHON): PyPI's CUDA
#      torch depends on it and loads its libnccl.so.2, so it is there wherever LibTorch has CUDA.
#      The wheel is a namespace package (nvidia.nccl.__file__ is None): it is located through
#      nvidia.nccl.__path__;
#   4. the system (the default search paths: /usr/include, /usr/lib/x86_64-linux-gnu, ...).
# Header and library are taken from the same place. The wheel ships libnccl.so.2 without the
# unversioned link, hence both names.
#
# coil_find_nccl(<required>) sets, in the caller's scope:
#   COIL_NCCL_FOUND, COIL_NCCL_INCLUDE_DIR, COIL_NCCL_LIBRARY, COIL_NCCL_FROM (where, in words),
#   COIL_NCCL_VERSION (from nccl.h)
# and, with <required> true, stops the configure with one line naming -DCOIL_NCCL=OFF when NCCL is
# nowhere. CUDAToolkit_INCLUDE_DIRS / CUDAToolkit_LIBRARY_DIR are used when set (find_package
# (CUDAToolkit) before). The module is self-contained so that tests/test_nccl_lookup.sh configures
# it alone, in seconds, in a throwaway project.
include_guard(GLOBAL)

# _coil_nccl_try(<words> <include hints> <library hints>): both files under the hints only.
macro(_coil_nccl_try _from _inc_hints _lib_hints)
  if(NOT COIL_NCCL_FOUND AND NOT "${_inc_hints}" STREQUAL "")
    find_path(_coil_nccl_inc nccl.h PATHS ${_inc_hints} NO_DEFAULT_PATH NO_CACHE)
    find_library(_coil_nccl_lib NAMES nccl libnccl.so.2 PATHS ${_lib_hints} NO_DEFAULT_PATH NO_CACHE)
    if(_coil_nccl_inc AND _coil_nccl_lib)
      set(COIL_NCCL_FOUND TRUE)
      set(COIL_NCCL_INCLUDE_DIR "${_coil_nccl_inc}")
      set(COIL_NCCL_LIBRARY "${_coil_nccl_lib}")
      set(COIL_NCCL_FROM "${_from}")
    endif()
    unset(_coil_nccl_inc)
    unset(_coil_nccl_lib)
  endif()
endmacro()

function(coil_find_nccl _required)
  set(COIL_NCCL_FOUND FALSE)
  set(_looked "")

  # 1. Where the caller says.
  set(_root "${COIL_NCCL_ROOT}")
  if(NOT _root)
    set(_root "$ENV{NCCL_ROOT}")
  endif()
  if(NOT _root)
    set(_root "$ENV{NCCL_HOME}")
  endif()
  if(_root)
    _coil_nccl_try("COIL_NCCL_ROOT ${_root}" "${_root}/include" "${_root}/lib;${_root}/lib64")
    list(APPEND _looked "${_root}")
  endif()

  # 2. The CUDA Toolkit.
  if(CUDAToolkit_INCLUDE_DIRS)
    _coil_nccl_try("the CUDA Toolkit" "${CUDAToolkit_INCLUDE_DIRS}" "${CUDAToolkit_LIBRARY_DIR}")
    list(APPEND _looked "the CUDA Toolkit (${CUDAToolkit_INCLUDE_DIRS})")
  endif()

  # 3. The venv's nvidia-nccl wheel.
  if(COIL_PYTHON AND EXISTS "${COIL_PYTHON}")
    execute_process(COMMAND "${COIL_PYTHON}" -c "import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])"
                    OUTPUT_VARIABLE _wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
    if(_rc EQUAL 0 AND IS_DIRECTORY "${_wheel}")
      _coil_nccl_try("the venv's nvidia-nccl wheel" "${_wheel}/include" "${_wheel}/lib")
      list(APPEND _looked "the nvidia-nccl wheel (${_wheel})")
    else()
      list(APPEND _looked "the nvidia-nccl wheel (none in ${COIL_PYTHON})")
    endif()
  endif()

  # 4. The system.
  if(NOT COIL_NCCL_FOUND)
    find_path(_sys_inc nccl.h NO_CACHE)
    find_library(_sys_lib NAMES nccl libnccl.so.2 NO_CACHE)
    if(_sys_inc AND _sys_lib)
      set(COIL_NCCL_FOUND TRUE)
      set(COIL_NCCL_INCLUDE_DIR "${_sys_inc}")
      set(COIL_NCCL_LIBRARY "${_sys_lib}")
      set(COIL_NCCL_FROM "the system")
    endif()
    list(APPEND _looked "the system")
  endif()

  set(COIL_NCCL_VERSION "")
  if(COIL_NCCL_FOUND)
    file(STRINGS "${COIL_NCCL_INCLUDE_DIR}/nccl.h" _v REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
    foreach(_part MAJOR MINOR PATCH)
      string(REGEX MATCH "NCCL_${_part} +([0-9]+)" _m "${_v}")
      list(APPEND COIL_NCCL_VERSION "${CMAKE_MATCH_1}")
    endforeach()
    list(JOIN COIL_NCCL_VERSION "." COIL_NCCL_VERSION)
    message(STATUS "NCCL ${COIL_NCCL_VERSION}: ${COIL_NCCL_LIBRARY}, headers ${COIL_NCCL_INCLUDE_DIR} (from ${COIL_NCCL_FROM})")
  elseif(_required)
    list(JOIN _looked ", " _looked)
    # The leading space keeps CMake from wrapping the message: one line, as Coil's errors are.
    message(FATAL_ERROR " NCCL not found (looked in ${_looked}): LibTorch has CUDA, so Coil's GPU collectives need "
                        "it; install NCCL (pip install nvidia-nccl-cu13, or point -DCOIL_NCCL_ROOT at it), or "
                        "configure with -DCOIL_NCCL=OFF to build without multi-GPU collectives")
  endif()
  foreach(_var COIL_NCCL_FOUND COIL_NCCL_INCLUDE_DIR COIL_NCCL_LIBRARY COIL_NCCL_FROM COIL_NCCL_VERSION)
    set(${_var} "${${_var}}" PARENT_SCOPE)
  endforeach()
endfunction()
