"""The decoder frontend imports neither the schedules nor the compiler (it builds the KV kernels only
through the format object the compiler hands it), proven in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_decoder_frontend_imports_neither_schedules_nor_the_compiler():
    script = (
        "import json, sys\n"
        "import tensorpress.frontend.decoders.causal_lm, tensorpress.frontend.decoders.llama\n"
        "import tensorpress.frontend.decoders.opt, tensorpress.frontend.hf_decoder\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('tensorpress.schedules', "
        "'tensorpress.compiler')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
