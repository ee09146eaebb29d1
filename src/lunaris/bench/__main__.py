"""The peak-memory worker: python -m lunaris.bench --memory-worker '{...}' (started by lunaris.bench.memory)."""

import json
import sys

if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
    from lunaris.bench.memory import memory_worker
    print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
else:
    sys.exit("usage: python -m lunaris.bench --memory-worker SPEC (internal); use `lunaris bench`")
