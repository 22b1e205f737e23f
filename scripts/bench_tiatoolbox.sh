#!/usr/bin/env bash
# Peer benchmark (issue 5 item 6): nervedet's U-Net, with nervedet's weights, run on a slide by TIAToolbox 2.x's
# SemanticSegmentor (0.5 µm/px, 768-px patches, stride 704, batch 1 as nervedet on the CPU), for wall time, peak RSS and the nerve
# mask (scripts/tiatoolbox_peer.py does the work; it does not import nervedet).
#
# Run by hand, NOT in CI: it builds a separate venv (TIAToolbox pins its own torch) and downloads packages.
#
#   scripts/bench_tiatoolbox.sh SLIDE OUT_JSON [extra tiatoolbox_peer.py options]
#   e.g. scripts/bench_tiatoolbox.sh runs/benchmark/full_1.5mm_0.5.svs runs/benchmark/tiatoolbox.json
#   then: python scripts/benchmark.py --quick --tiatoolbox-json runs/benchmark/tiatoolbox.json
#
# The venv is $TIA_VENV (default .venv-tiatoolbox in the repository). It is created when missing with
#   pip install tiatoolbox segmentation-models-pytorch==0.6.0 timm safetensors
# Note: tiatoolbox 2.1.3 pins torch<2.13, so pip pulls torch 2.12.1 (on Linux x86-64 the default CUDA build,
# 2.12.1+cu130, which also runs on the CPU) while nervedet's own venv has torch 2.14.1: a fairness caveat
# when comparing timings.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 SLIDE OUT_JSON [tiatoolbox_peer.py options]" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${TIA_VENV:-$here/../.venv-tiatoolbox}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating the TIAToolbox venv in $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --upgrade pip
    "$venv/bin/pip" install tiatoolbox segmentation-models-pytorch==0.6.0 timm safetensors
fi

mkdir -p "$(dirname "$2")"
exec "$venv/bin/python" "$here/tiatoolbox_peer.py" "$@"
