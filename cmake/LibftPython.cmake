# The Python interpreter libft's build uses: its torch provides LibTorch, and its transformers,
# safetensors and sentencepiece make the reference files the tests compare against.
# Order: -DLIBFT_PYTHON=..., else $LIBFT_VENV/bin/python, else ~/.cache/libft/venv/bin/python
# (what scripts/setup.sh makes), else python3 on PATH.
include_guard(GLOBAL)
if(NOT LIBFT_PYTHON)
  if(DEFINED ENV{LIBFT_VENV} AND EXISTS "$ENV{LIBFT_VENV}/bin/python")
    set(_py "$ENV{LIBFT_VENV}/bin/python")
  elseif(EXISTS "$ENV{HOME}/.cache/libft/venv/bin/python")
    set(_py "$ENV{HOME}/.cache/libft/venv/bin/python")
  else()
    find_program(_py NAMES python3 python)
  endif()
  set(LIBFT_PYTHON "${_py}" CACHE FILEPATH "Python interpreter for LibTorch discovery and reference tests")
endif()
