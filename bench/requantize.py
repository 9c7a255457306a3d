#!/usr/bin/env python3
"""Re-quantizes a GGUF with llama.cpp's own quantizer (through llama-cpp-python), e.g. the
default SmolLM2 Q4_1 file to Q8_0, so both engines can be compared on that format too. The
weights pass through the source format's rounding first; speed is all these files are for.

    python3 bench/requantize.py IN.gguf OUT.gguf q8_0
"""
import sys

import llama_cpp

FTYPES = {
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}

src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = FTYPES[kind]
params.allow_requantize = True
params.nthread = 2
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
if rc != 0:
    sys.exit(f"llama_model_quantize failed: {rc}")
print("wrote", dst)
