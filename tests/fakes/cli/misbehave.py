"""A stand-in agent CLI that misbehaves on purpose (the runner is what is under test).

The first argument after the program picks the behaviour: exit-nonzero, hang, flood, non-json.
Behaviour is read from CORRAL_FAKE_CLI so the runner can pass its usual flags untouched.
"""

from __future__ import annotations

import json
import os
import sys
import time

mode = os.environ.get("CORRAL_FAKE_CLI", "exit-nonzero")
sys.stdin.read()
out = sys.stdout.buffer
if mode == "exit-nonzero":
    print("fatal: something broke inside the CLI", file=sys.stderr)
    sys.exit(3)
elif mode == "hang":
    out.write(b'{"type":"system","subtype":"init","session_id":"s-hang"}\n')
    out.flush()
    time.sleep(3600)
elif mode == "flood":
    line = json.dumps({"type": "assistant", "message": {"content": [
        {"type": "text", "text": "x" * 1000}]}}).encode() + b"\n"
    for _ in range(50 * 1024):  # about 50 MB
        out.write(line)
    out.write(b"y" * (20 * 1024 * 1024) + b"\n")  # one 20 MB line with no JSON in it
    out.write(json.dumps({"type": "result", "subtype": "success", "is_error": False,
                          "result": "flooded", "total_cost_usd": 0.01,
                          "usage": {"input_tokens": 1, "output_tokens": 2}}).encode() + b"\n")
elif mode == "non-json":
    for n in range(100):
        out.write(f"plain text line {n}\n".encode())
    sys.exit(0)
