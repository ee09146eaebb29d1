"""The fresh-process workers of the benchmarks (started by lunaris.bench.memory and lunaris.bench.attention):
python -m lunaris.bench --memory-worker '{...}' | --attention-worker '{...}'."""

import json
import sys

if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
    from lunaris.bench.memory import memory_worker
    print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
elif len(sys.argv) == 3 and sys.argv[1] == "--attention-worker":
    from lunaris.bench.attention import memory_worker as attention_worker
    print(json.dumps(attention_worker(json.loads(sys.argv[2]))))
else:
    sys.exit("usage: python -m lunaris.bench --memory-worker SPEC | --attention-worker SPEC (internal); use "
             "`lunaris bench`")
