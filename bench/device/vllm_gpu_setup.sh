#!/usr/bin/env bash
# vllm_gpu_setup.sh - bring vLLM 0.24.0 (CUDA 13.0 build) onto the offline H200 device machine.
#
# The wheels travel as parts of one tar under <repo>/.whl-vllm/ (ignored by git; each device
# call carries ONE part, e.g. carry=[".whl-vllm/vllm-wheels.tar.part-00"]; parts already sent
# stay on the warm machine). This script, run from anywhere inside the repo copy on the device:
#   * lists which parts are there / missing (sizes + sha256 checked);
#   * once all are there: cat -> verify -> untar -> pip install --target $VLLM_SITE (default
#     /tmp/vllm-site); idempotent (a marker with the tar's sha256 skips the work next time);
#   * checks vLLM's and the shipped wheels' requirements against image + target;
#   * prints (and, when sourced, exports) PYTHONPATH and the env vLLM needs here.
#
# Usage (on the device, repo root):
#   bash bench/device/vllm_gpu_setup.sh --check        # report parts + image versions, never fails
#   source bench/device/vllm_gpu_setup.sh               # install if possible, export env
#   source bench/device/vllm_gpu_setup.sh --smoke       # + import smoke test (vllm, _C, FA3)
#   source bench/device/vllm_gpu_setup.sh --smoke-llm   # + tiny random Qwen3 LLM(...).generate
# Exit/return status: 0 ok, 3 parts missing, 4 corrupt part/tar, 5 install failed, 6 smoke failed.
#
# Contents (built off-device, see the report): vllm 0.24.0 re-packed (same files, LZMA-compressed)
# minus vllm_flash_attn/_vllm_fa2_C (FA2; Hopper uses FA3), vllm-rs (Rust serve frontend),
# _moe_C_stable_libtorch (MoE kernels), _flashmla_C/_flashmla_extension_C (MLA), third_party/deep_gemm
# (FP8 DeepGEMM) and third_party/fmha_sm100 (SM100/MiniMax-M3); + 20 small wheels missing from the
# image; typing_extensions 4.15.0 is installed only if the image's is older than 4.14.1.
# Needs: no flashinfer -> VLLM_USE_FLASHINFER_SAMPLER=0 (exported below).

_vllm_setup_main() {
  local mode_check=0 mode_smoke=0 mode_smoke_llm=0 arg
  for arg in "$@"; do
    case "$arg" in
      --check) mode_check=1 ;;
      --smoke) mode_smoke=1 ;;
      --smoke-llm) mode_smoke=1; mode_smoke_llm=1 ;;
      *) echo "[vllm-setup] unknown argument: $arg" >&2; return 2 ;;
    esac
  done

  local here repo whl_dir site stage py
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  repo="$(cd "$here/../.." && pwd)"
  whl_dir="${VLLM_WHL_DIR:-$repo/.whl-vllm}"
  site="${VLLM_SITE:-/tmp/vllm-site}"
  stage="${VLLM_STAGE:-/tmp/vllm-stage}"
  py="${PYTHON:-python3}"

  # --- expected parts: "name size sha256"; a parts.txt in $whl_dir (same format, plus a line
  #     "TAR <sha256>") overrides this list after a re-chunking.
  local tar_sha="92b63139f9ef2f4d9b95d590377f06042a233158811221660a55ad4e5b2497fe"
  local -a parts=(
    "vllm-wheels.tar.part-00 60405760 7f43437cb467dcdfba5d0b36020ba7557f7143693d871d73ef3e3a74a6ec6a67"
    "vllm-wheels.tar.part-01 60405760 87f2300128318bc66c8e36e193c9412230f29e52f900fc9b196ea32a3c871d62"
  )
  # parts already verified are also stashed in $cache (outside the repo copy), so that they
  # survive even if the device's working tree were laid anew between two warm calls
  local cache="${VLLM_PARTS_CACHE:-/tmp/vllm-parts}"
  mkdir -p "$cache"
  local plist=""
  if [ -f "$whl_dir/parts.txt" ]; then plist="$whl_dir/parts.txt"; cp -f "$plist" "$cache/parts.txt";
  elif [ -f "$cache/parts.txt" ]; then plist="$cache/parts.txt"; fi
  if [ -n "$plist" ]; then
    parts=()
    local l
    while IFS= read -r l; do
      case "$l" in
        TAR\ *) tar_sha="${l#TAR }" ;;
        ""|\#*) ;;
        *) parts+=("$l") ;;
      esac
    done < "$plist"
    echo "[vllm-setup] using part list from $plist (${#parts[@]} parts)"
  fi

  local marker="$site/.vllm-setup-done"
  local installed=0
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$tar_sha" ]; then installed=1; fi

  # --- report parts
  local p name size sha f cand found have_all=1 bad=0 missing=""
  local -a part_paths=()
  if [ "$installed" = 1 ]; then
    echo "[vllm-setup] already installed in $site (tar $tar_sha); parts not re-checked"
  else
    for p in "${parts[@]}"; do
      read -r name size sha <<<"$p"
      found=""
      for cand in "$whl_dir/$name" "$cache/$name"; do
        [ -f "$cand" ] || continue
        if [ "$(stat -L -c %s "$cand")" != "$size" ]; then
          echo "[vllm-setup] BAD SIZE $cand: $(stat -L -c %s "$cand") != $size"; bad=1; continue
        fi
        if [ "$(sha256sum "$cand" | cut -d' ' -f1)" != "$sha" ]; then
          echo "[vllm-setup] BAD SHA  $cand"; bad=1; continue
        fi
        found="$cand"; break
      done
      if [ -z "$found" ]; then
        have_all=0; missing="$missing $name"
        echo "[vllm-setup] MISSING  $name"
      else
        if [ "$found" != "$cache/$name" ]; then
          cp -f "$found" "$cache/$name.tmp" && mv -f "$cache/$name.tmp" "$cache/$name"
        fi
        part_paths+=("$found")
        echo "[vllm-setup] ok       $name ($size bytes, $found; stashed in $cache)"
      fi
    done
    [ "$have_all" = 1 ] && bad=0   # a bad copy somewhere is harmless once a good one exists
  fi

  if [ "$mode_check" = 1 ]; then
    echo "[vllm-setup] --- image facts"
    env -u PYTHONPATH "$py" - <<'PYEOF'
import sys, importlib.metadata as md
print("python", sys.version.split()[0], sys.executable)
for n in ["torch", "torchvision", "torchaudio", "triton", "transformers", "tokenizers",
          "huggingface-hub", "safetensors", "numpy", "typing-extensions", "anyio", "httpx",
          "aiohttp", "protobuf", "pip", "packaging", "uvloop", "pillow", "numba",
          "pydantic", "fastapi", "openai", "pyzmq", "msgspec", "flashinfer-python"]:
    try:
        print(f"  {n:18s} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  {n:18s} -")
try:
    import lzma; print("  lzma module        ok")
except Exception as e:
    print("  lzma module        MISSING:", e, "(the vllm wheel is LZMA-compressed; pip needs it)")
try:
    import torch
    print("  torch cuda", torch.version.cuda, "| gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))
except Exception as e:
    print("  torch import failed:", e)
PYEOF
    command -v nvcc >/dev/null && nvcc --version | tail -1
    df -h /tmp | tail -1
    if [ "$installed" = 1 ]; then echo "[vllm-setup] status: INSTALLED";
    elif [ "$have_all" = 1 ]; then echo "[vllm-setup] status: all parts present, not installed yet (run without --check)";
    else echo "[vllm-setup] status: waiting for parts:$missing"; fi
    return 0
  fi

  if [ "$installed" != 1 ]; then
    if [ "$bad" = 1 ]; then echo "[vllm-setup] corrupt part(s): re-send them" >&2; return 4; fi
    if [ "$have_all" != 1 ]; then echo "[vllm-setup] parts still missing:$missing" >&2; return 3; fi

    local t0=$SECONDS
    rm -rf "$stage" && mkdir -p "$stage" || return 5
    cat "${part_paths[@]}" > "$stage/vllm-wheels.tar" || return 5
    if [ "$(sha256sum "$stage/vllm-wheels.tar" | cut -d' ' -f1)" != "$tar_sha" ]; then
      echo "[vllm-setup] reassembled tar has the wrong sha256 (parts out of order?)" >&2; return 4
    fi
    tar -xf "$stage/vllm-wheels.tar" -C "$stage" && rm -f "$stage/vllm-wheels.tar" || return 5
    ( cd "$stage/vllm-wheels" && awk '{print $1"  "$3}' MANIFEST.txt | sha256sum -c --quiet ) || { echo "[vllm-setup] wheel checksum mismatch" >&2; return 4; }

    local -a wheels=("$stage"/vllm-wheels/wheels/*.whl)
    # typing_extensions only if the image's is older than pydantic 2.12 needs
    if ! env -u PYTHONPATH "$py" -c '
import importlib.metadata as md, sys
from packaging.version import Version
try: v = md.version("typing-extensions")
except md.PackageNotFoundError: sys.exit(1)
sys.exit(0 if Version(v) >= Version("4.14.1") else 1)' 2>/dev/null; then
      echo "[vllm-setup] image typing_extensions < 4.14.1 (or absent): adding typing_extensions 4.15.0"
      wheels+=("$stage"/vllm-wheels/cond/typing_extensions-*.whl)
    fi
    rm -rf "$site.tmp"
    echo "[vllm-setup] pip install ${#wheels[@]} wheels -> $site"
    if ! env -u PYTHONPATH "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
         --disable-pip-version-check ${VLLM_SETUP_PIP_EXTRA:-} --target "$site.tmp" "${wheels[@]}"; then
      echo "[vllm-setup] pip install failed" >&2; return 5
    fi
    rm -rf "$site" && mv "$site.tmp" "$site" && echo "$tar_sha" > "$marker" || return 5
    echo "[vllm-setup] installed in $((SECONDS - t0)) s"

    # requirement report (informational)
    PYTHONPATH="$site" "$py" - "$site" <<'PYEOF'
import sys, re, importlib.metadata as md
from packaging.requirements import Requirement
site = sys.argv[1]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
# declared by vllm, deliberately not shipped: only imported lazily, off the Qwen3/FLASH_ATTN/eager path
skipped = set(map(norm, """blake3 lm-format-enforcer outlines_core diskcache lark
 jsonschema mistral_common compressed-tensors depyf watchfiles python-json-logger ijson setproctitle
 prometheus-fastapi-instrumentator anthropic model-hosting-container-standards mcp opentelemetry-sdk
 opentelemetry-api opentelemetry-exporter-otlp opentelemetry-semantic-conventions-ai flashinfer-python
 flashinfer-cubin tilelang nvidia-cudnn-frontend fastsafetensors nvidia-cutlass-dsl
 quack-kernels tokenspeed-mla humming-kernels numba setuptools opencv-python-headless""".split()))
# shipped on purpose at another version than vllm pins
known = {"apache-tvm-ffi": "0.1.10 shipped for xgrammar 0.2.6; vllm's ==0.1.9 pin is for flashinfer (not shipped)"}
shipped = [d for d in md.distributions(path=[site])]
problems = []
for d in shipped:
    for r in d.requires or []:
        req = Requirement(r)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            v = md.version(req.name)
        except md.PackageNotFoundError:
            v = None
        tag = "expected-skip" if norm(req.name) in skipped else ("known" if norm(req.name) in known else "UNEXPECTED")
        if v is None:
            problems.append(f"  {tag:13s} {d.metadata['Name']} needs {req} : not installed")
        elif req.specifier and not req.specifier.contains(v, prereleases=True):
            note = f" ({known[norm(req.name)]})" if tag == "known" else ""
            problems.append(f"  {tag:13s} {d.metadata['Name']} needs {req} : have {v}{note}")
print(f"[vllm-setup] requirement check over {len(shipped)} shipped dists:")
print("\n".join(sorted(problems)) if problems else "  all satisfied")
PYEOF
  fi

  # --- environment
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$site/bin:$PATH"
  export VLLM_USE_FLASHINFER_SAMPLER=0   # flashinfer is not shipped; the sampler would import it
  export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  echo "[vllm-setup] environment (exported when sourced):"
  echo "  export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
  echo "  export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1"

  if [ "$mode_smoke" = 1 ]; then
    "$py" - <<'PYEOF' || return 6
import time, torch
t = time.time()
import vllm
from vllm import LLM, SamplingParams
import vllm._C_stable_libtorch
from vllm.platforms import current_platform
from vllm.vllm_flash_attn import flash_attn_interface as fa
print(f"[smoke] vllm {vllm.__version__} from {vllm.__file__}; torch {torch.__version__} cuda {torch.version.cuda}")
print(f"[smoke] platform {type(current_platform).__name__}, capability {current_platform.get_device_capability()}")
print(f"[smoke] FA3 available={fa.FA3_AVAILABLE} ({fa.FA3_UNAVAILABLE_REASON}); FA2 available={fa.FA2_AVAILABLE} (dropped on purpose)")
print(f"[smoke] rms_norm op registered: {hasattr(torch.ops._C, 'rms_norm')}; import took {time.time()-t:.1f}s")
assert fa.FA3_AVAILABLE
PYEOF
  fi

  if [ "$mode_smoke_llm" = 1 ]; then
    local sdir="${VLLM_SMOKE_DIR:-/tmp/vllm-smoke}"
    mkdir -p "$sdir"
    cat > "$sdir/smoke_llm.py" <<'PYEOF'
import os, sys, time

def make_model(path):
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast, Qwen3Config, AutoModelForCausalLM
    V = 1024
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, V)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>").save_pretrained(path)
    cfg = Qwen3Config(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)

def main():
    path = sys.argv[1]
    make_model(path)
    from vllm import LLM, SamplingParams
    t = time.time()
    llm = LLM(model=path, enforce_eager=True, dtype="bfloat16", max_model_len=512,
              gpu_memory_utilization=0.2, seed=0)
    print(f"[smoke-llm] LLM ready in {time.time()-t:.1f}s")
    out = llm.generate(["w5 w6 w7 w8", "w100 w200"],
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for o in out:
        print("[smoke-llm]", o.prompt_token_ids, "->", o.outputs[0].token_ids)
    print("[smoke-llm] OK")

if __name__ == "__main__":
    main()
PYEOF
    "$py" "$sdir/smoke_llm.py" "$sdir/tiny-qwen3" || return 6
  fi
  return 0
}

if (return 0 2>/dev/null); then
  _vllm_setup_main "$@"
else
  _vllm_setup_main "$@"
  exit $?
fi
