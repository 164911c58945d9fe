"""``qcache serve``: an OpenAI-compatible HTTP server with continuous batching under a KV budget."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import QCacheError
from .common import add_lazy_options, add_mesh_options, add_parser, add_quiet, human_bytes, load_model, log_for, \
    parse_size, positive


def run(args) -> int:
    from ..io.checkpoint import read_config
    from ..lazy.schedule import Schedule
    from ..serve import server, service

    if args.fastv is not None:  # the slot pool lays out one visual segment size for every layer
        raise QCacheError("qcache serve does not support --fastv yet (the slot pool has no pruned visual segments); "
                          "use qcache generate, eval or bench")
    if args.distributed is not None:
        raise QCacheError("qcache serve runs on one host: --distributed (multi-host) is not supported; "
                          "use --mesh over this host's devices")
    budget = parse_size("--kv-budget", args.kv_budget)
    for name in ("max_queue", "max_model_len", "prefill_budget"):
        positive("--" + name.replace("_", "-"), getattr(args, name))
    positive("--max-images", args.max_images, 0)
    positive("--port", args.port, 0)
    cfg = read_config(Path(args.ckpt))  # everything checkable without the weights is checked first
    schedule = Schedule.resolve(args.lazy, cfg.text.num_layers, mode=args.mode, ckpt_dir=args.ckpt)
    if cfg.anyres or cfg.family != "llava":
        raise QCacheError("serving LLaVA-NeXT and Qwen2-VL checkpoints is not supported yet (each image's token count "
                          "depends on its size); serve a LLaVA-1.5-style or text-only checkpoint")
    sock = server.bind(args.host, args.port)  # fail on a taken port before loading anything
    log = log_for(args) or (lambda msg: None)
    model = load_model(args)
    model.check_schedule(schedule)  # a pruned checkpoint runs only schedules that leave its removed weights unused
    conf = service.ServeConfig(kv_budget=budget, max_model_len=args.max_model_len, max_images=args.max_images,
                               max_queue=args.max_queue, prefill_budget=args.prefill_budget,
                               served_name=args.served_model_name or Path(args.ckpt).resolve().name)
    warm = [int(x) for x in args.warmup.split(",")] if args.warmup else []
    svc = service.build(model, schedule, conf, warmup_lengths=warm, log=log)
    host, port = sock.getsockname()[:2]
    lay = svc.engine.layout
    # One line a script can wait for (the tests and benchmarks.serve read the port from it).
    print(f"qcache serve: model {conf.served_name!r} on http://{host}:{port}/v1 - {lay.slots} slots of {lay.max_len} "
          f"tokens, {schedule.describe()} schedule, KV pool {human_bytes(svc.engine.pool_kv_bytes)}", file=sys.stderr,
          flush=True)
    server.serve(svc, sock, shutdown_timeout=args.shutdown_timeout, log=log)
    return 0


def register(sub) -> None:
    p = add_parser(sub, "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching "
                                      "under a KV-cache budget)")
    p.add_argument("ckpt", help="checkpoint directory written by `qcache convert`")
    add_lazy_options(p)
    p.add_argument("--fastv", metavar="K:R", default=None, help="not supported by serve (refused)")
    p.add_argument("--kv-budget", default="1GiB", metavar="SIZE",
                   help="memory for the KV caches of all slots (e.g. 2GiB, 512MiB): the server runs as many "
                        "sequences at once as it holds under the schedule")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokens per sequence, prompt (image tokens included) plus output; default: the model's context")
    p.add_argument("--max-images", type=int, default=1, help="images per request (each slot reserves their tokens)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; beyond: 429")
    p.add_argument("--prefill-budget", type=int, default=1024,
                   help="prompt tokens prefilled between two decode steps at most (at least one request)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed at start-up)")
    p.add_argument("--served-model-name", default=None, help="the model id clients give; default: the checkpoint's "
                                                             "directory name")
    p.add_argument("--warmup", default=None, metavar="N[,N...]",
                   help="prompt lengths whose prefill compiles at start-up (else on first use)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds SIGTERM waits for requests in flight before aborting them")
    add_mesh_options(p)
    add_quiet(p)
    p.set_defaults(func=run)
