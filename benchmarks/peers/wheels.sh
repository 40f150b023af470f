# Sourced by the peer scripts: diffusers (and what it needs) from wheels in .whl/, if present.
# The wheels, fetched where pip can reach a registry (pure Python, any platform):
#   pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata "huggingface_hub>=1.32,<2"
if ls .whl/diffusers-*.whl > /dev/null 2>&1; then
  # diffusers and importlib_metadata first; a newer huggingface_hub only if the machine's is
  # too old for diffusers' imports.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/diffusers-*.whl .whl/importlib_metadata-*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  if ! python3 -c "import diffusers.hooks, diffusers.models" 2> /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/huggingface_hub-*.whl || exit 1
  fi
else
  export PYTHONPATH=$PWD
fi
