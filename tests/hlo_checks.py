"""Small readers of lowered (StableHLO) and compiled (HLO) text, so a test can assert
what XLA was asked to run, not only that the numbers came out right.

They live apart from the GPU tests so they are themselves tested on CPU
(tests/test_hlo_checks.py) against HLO this machine compiles and hand-written snippets
in the forms the GPU produces.

Forms recognised (jax 0.10/0.11, XLA GPU):
- cuDNN fused attention: custom call targets ``__cudnn$fmha*`` (``__cudnn$fmhaSoftmax``,
  ``...Backward``, with ``ScaleBias``/``Dropout``/``F8`` variants; see
  jax/_src/cudnn/fused_attention_stablehlo.py), as ``stablehlo.custom_call @__cudnn$fmha...``
  when lowered and ``custom_call_target="__cudnn$fmha..."`` when compiled.
- host offload: lowered, ``annotate_device_placement`` custom calls tagged
  ``_xla_buffer_placement = "pinned_host"``; compiled (after XLA's host-offloader pass),
  ``MoveToHost`` custom calls or buffers in host memory space 5 (layout ``{...:S(5)}``).
"""

from __future__ import annotations

import re
from collections import Counter

_CUDNN_FMHA = re.compile(r'(?:custom_call_target="|stablehlo\.custom_call @"?)(__cudnn\$fmha\w*)')
_HOST_SPACE = re.compile(r"\{[0-9,]*:[^}]*S\(5\)[^}]*\}")  # a layout in host memory space 5
_DOT = re.compile(r"stablehlo\.dot_general\b.*:\s*\(tensor<(?:[0-9?]+x)*(\w+)>,\s*tensor<(?:[0-9?]+x)*(\w+)>\)")


def cudnn_attention_calls(text: str) -> Counter:
    """Count of cuDNN fused-attention custom calls in lowered or compiled text, by target."""
    return Counter(_CUDNN_FMHA.findall(text))


def host_offload_transfers(text: str) -> int:
    """Instructions that move data to host memory: lowered ``annotate_device_placement``
    to ``pinned_host``, or compiled ``MoveToHost`` calls / results in memory space S(5)."""
    n = 0
    for line in text.splitlines():
        if "annotate_device_placement" in line and "pinned_host" in line:
            n += 1
        elif 'custom_call_target="MoveToHost"' in line:
            n += 1
        elif _HOST_SPACE.search(line):
            n += 1  # an instruction writing or reading a buffer in host memory
    return n


def dot_operand_dtypes(stablehlo: str) -> Counter:
    """Count of ``stablehlo.dot_general`` ops by (lhs, rhs) element type."""
    return Counter(_DOT.findall(stablehlo))
