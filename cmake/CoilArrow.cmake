# Finds Apache Arrow's C++ library and its Parquet reader for data/parquet.cpp, in this order, and
# says which it took:
#   1. COIL_ARROW_ROOT (or the ARROW_HOME environment variable), when given: <root>/include and
#      <root>/lib or lib64;
#   2. the pyarrow wheel of the venv whose torch provides LibTorch (COIL_PYTHON, as for LibTorch):
#      pyarrow.get_include() and get_library_dirs(). The wheel ships only versioned libraries
#      (libarrow.so.2600, libparquet.so.2600; pyarrow.create_library_symlinks() would write the
#      unversioned names into the venv): the versioned files are linked by their full path, so the
#      venv is left as pip made it;
#   3. the system: find_package(Arrow) and find_package(Parquet) (Debian's or Apache's packages, or
#      a prefix in CMAKE_PREFIX_PATH).
# Headers and libraries come from the same place. Then a small program that passes a std::string to
# Arrow is compiled and linked against them: a library built with the other C++ ABI
# (_GLIBCXX_USE_CXX11_ABI) fails that link and is refused with one line, never at run time. Arrow's
# headers need C++20 (the one file that includes them, data/parquet.cpp, is built as C++20).
#
# COIL_PARQUET: AUTO (the default) builds with Parquet when Arrow is found and without it, with a
# warning, when not; ON requires it (the configure stops with one line); OFF never looks.
#
# coil_find_arrow() sets, in the caller's scope: COIL_ARROW_FOUND, COIL_ARROW_FROM (where, in
# words), COIL_ARROW_VERSION, and defines the imported target coil::parquet (headers, libparquet and
# libarrow). Executables find the libraries through their RUNPATH (CMake's build RPATH holds the
# directories of libraries linked by full path), so `coil` runs without LD_LIBRARY_PATH.
include_guard(GLOBAL)
include(CheckCXXSourceCompiles)

# The library file `name` (libarrow, libparquet) in `dir`: the unversioned link or, as in the
# wheel, the file with the shortest version suffix (libarrow.so.2600 rather than .so.2600.1.0).
function(_coil_arrow_library _out _dir _name)
  set(${_out} "" PARENT_SCOPE)
  if(EXISTS "${_dir}/${_name}.so")
    set(${_out} "${_dir}/${_name}.so" PARENT_SCOPE)
    return()
  endif()
  file(GLOB _cands "${_dir}/${_name}.so.*")
  set(_best "")
  foreach(_c IN LISTS _cands)
    get_filename_component(_n "${_c}" NAME)
    if(_n MATCHES "^${_name}\\.so\\.[0-9]+$")
      string(LENGTH "${_c}" _len)
      if(NOT _best OR _len LESS _best_len)
        set(_best "${_c}")
        set(_best_len ${_len})
      endif()
    endif()
  endforeach()
  set(${_out} "${_best}" PARENT_SCOPE)
endfunction()

# Tries headers in `inc` and the libraries in the directories `libdirs`.
macro(_coil_arrow_try _from _inc _libdirs)
  if(NOT COIL_ARROW_FOUND AND EXISTS "${_inc}/parquet/arrow/reader.h")
    foreach(_d ${_libdirs})
      _coil_arrow_library(_arrow_lib "${_d}" libarrow)
      _coil_arrow_library(_parquet_lib "${_d}" libparquet)
      if(_arrow_lib AND _parquet_lib)
        set(COIL_ARROW_FOUND TRUE)
        set(COIL_ARROW_FROM "${_from}")
        set(_coil_arrow_inc "${_inc}")
        set(_coil_arrow_libs "${_parquet_lib};${_arrow_lib}")
        break()
      endif()
    endforeach()
    if(NOT COIL_ARROW_FOUND)
      list(APPEND _looked "${_from}: headers but no libarrow/libparquet in ${_libdirs}")
    endif()
  endif()
endmacro()

function(coil_find_arrow)
  set(COIL_ARROW_FOUND FALSE)
  set(_looked "")
  set(COIL_PARQUET AUTO CACHE STRING "Read Parquet through Apache Arrow: AUTO, ON or OFF")
  set_property(CACHE COIL_PARQUET PROPERTY STRINGS AUTO ON OFF)
  if(COIL_PARQUET STREQUAL "OFF")
    set(COIL_ARROW_FOUND FALSE PARENT_SCOPE)
    set(COIL_ARROW_FROM "not looked for (COIL_PARQUET=OFF)" PARENT_SCOPE)
    return()
  endif()

  # 1. Where the caller says.
  set(_root "${COIL_ARROW_ROOT}")
  if(NOT _root)
    set(_root "$ENV{ARROW_HOME}")
  endif()
  if(_root)
    _coil_arrow_try("COIL_ARROW_ROOT ${_root}" "${_root}/include" "${_root}/lib;${_root}/lib64")
    if(NOT COIL_ARROW_FOUND)
      message(FATAL_ERROR "COIL_ARROW_ROOT=${_root} holds no Arrow with Parquet "
                          "(include/parquet/arrow/reader.h and lib/libarrow, lib/libparquet)")
    endif()
  endif()

  # 2. The venv's pyarrow.
  if(NOT COIL_ARROW_FOUND AND EXISTS "${COIL_PYTHON}")
    execute_process(
      COMMAND "${COIL_PYTHON}" -c
              "import pyarrow as pa; print(pa.get_include()); print(';'.join(pa.get_library_dirs())); print(pa.__version__)"
      OUTPUT_VARIABLE _py OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
    if(_rc EQUAL 0)
      string(REPLACE "\n" ";" _py "${_py}")
      list(GET _py 0 _py_inc)
      list(GET _py 1 _py_libs)
      list(GET _py 2 _py_version)
      string(REPLACE "," ";" _py_libs "${_py_libs}")
      _coil_arrow_try("pyarrow ${_py_version} of ${COIL_PYTHON}" "${_py_inc}" "${_py_libs}")
    else()
      list(APPEND _looked "${COIL_PYTHON} cannot import pyarrow")
    endif()
  elseif(NOT COIL_ARROW_FOUND)
    list(APPEND _looked "no Python at COIL_PYTHON=${COIL_PYTHON}")
  endif()

  # 3. The system.
  if(NOT COIL_ARROW_FOUND)
    find_package(Arrow QUIET CONFIG)
    find_package(Parquet QUIET CONFIG)
    if(Arrow_FOUND AND Parquet_FOUND)
      set(COIL_ARROW_FOUND TRUE)
      set(COIL_ARROW_FROM "the system (find_package: ${Arrow_DIR})")
      if(NOT TARGET coil::parquet)
        add_library(coil::parquet INTERFACE IMPORTED GLOBAL)
        if(TARGET Parquet::parquet_shared)
          target_link_libraries(coil::parquet INTERFACE Parquet::parquet_shared Arrow::arrow_shared)
        else()
          target_link_libraries(coil::parquet INTERFACE Parquet::parquet_static Arrow::arrow_static)
        endif()
      endif()
      get_target_property(_coil_arrow_inc Arrow::arrow_shared INTERFACE_INCLUDE_DIRECTORIES)
      set(_coil_arrow_libs coil::parquet)
    else()
      list(APPEND _looked "no Arrow/Parquet CMake package on the system")
    endif()
  endif()

  if(COIL_ARROW_FOUND AND NOT TARGET coil::parquet)
    add_library(coil::parquet INTERFACE IMPORTED GLOBAL)
    target_include_directories(coil::parquet SYSTEM INTERFACE "${_coil_arrow_inc}")
    target_link_libraries(coil::parquet INTERFACE ${_coil_arrow_libs})
  endif()

  # The version, from arrow/util/config.h.
  set(_version "")
  foreach(_i ${_coil_arrow_inc})
    if(EXISTS "${_i}/arrow/util/config.h")
      file(STRINGS "${_i}/arrow/util/config.h" _v REGEX "#define ARROW_VERSION_STRING")
      string(REGEX REPLACE ".*\"(.*)\".*" "\\1" _version "${_v}")
    endif()
  endforeach()

  # The C++ ABI: a std::string crosses into Arrow; a library of the other ABI does not link.
  if(COIL_ARROW_FOUND)
    set(CMAKE_REQUIRED_QUIET TRUE)
    set(CMAKE_REQUIRED_INCLUDES ${_coil_arrow_inc})
    set(CMAKE_REQUIRED_LIBRARIES ${_coil_arrow_libs})
    set(CMAKE_CXX_STANDARD 20)  # Arrow's headers need C++20 (std::span) since 24; this function's scope only
    unset(COIL_ARROW_ABI_OK CACHE)
    check_cxx_source_compiles([[
      #include <arrow/io/file.h>
      #include <parquet/arrow/reader.h>
      #include <string>
      int main() {
        auto f = arrow::io::ReadableFile::Open(std::string("/nonexistent"));
        return f.ok() ? 1 : 0;
      }]] COIL_ARROW_ABI_OK)
    if(NOT COIL_ARROW_ABI_OK)
      set(COIL_ARROW_FOUND FALSE)
      list(APPEND _looked "${COIL_ARROW_FROM}: a program passing std::string to it does not link "
                          "(built with the other _GLIBCXX_USE_CXX11_ABI, or its libraries are incomplete)")
    endif()
  endif()

  if(NOT COIL_ARROW_FOUND)
    string(JOIN "; " _why ${_looked})
    if(COIL_PARQUET STREQUAL "ON")
      message(FATAL_ERROR "COIL_PARQUET=ON but no usable Arrow/Parquet: ${_why}. Pass -DCOIL_ARROW_ROOT=<prefix>, "
                          "install pyarrow into the venv (scripts/setup), or -DCOIL_PARQUET=OFF")
    endif()
    message(WARNING "Parquet: off (no usable Arrow: ${_why}); .parquet inputs will be refused")
    set(COIL_ARROW_FROM "no usable Arrow found")
  endif()
  set(COIL_ARROW_FOUND ${COIL_ARROW_FOUND} PARENT_SCOPE)
  set(COIL_ARROW_FROM "${COIL_ARROW_FROM}" PARENT_SCOPE)
  set(COIL_ARROW_VERSION "${_version}" PARENT_SCOPE)
endfunction()
