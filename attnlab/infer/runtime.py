"""The decode runtime: owns the state of a batch being decoded.

``DecodeRuntime(model, policy, batch=B, max_length=N)`` allocates the cache once for N positions
per sequence (``ModelCache``: planar quantized planes, exact tail ring), keeps per-sequence
lengths as a device tensor (plus a host mirror it can keep without synchronising, since it makes
every change itself), and is the only thing that advances them. Everything that decodes goes
through it: ``forward`` (append any chunk, eager), ``prefill`` (prompts of different lengths,
chunked), ``step`` (one token per sequence) and ``truncate`` (rollback).

``step`` has no host synchronisation and no per-sequence Python work: the new token's position is
``lengths`` on the device, the fused write kernel stores every field at that position, the decode
kernel reads the device lengths, and kernel plans and scratch buffers were made once. On CUDA it
is captured once into a CUDA graph and replayed (``cuda_graphs``); on the CPU, or when a kernel
cannot serve the cache (logged once), it runs the same code eagerly. ``compile=True`` runs the
step's model code through ``torch.compile`` first (the layers' cache write + attention stay one
opaque op each, ``kernels.ops``), so norms, projections, RoPE and the MLP fuse into few kernels.
"""

from __future__ import annotations

import logging

import torch

from attnlab.cache import CachePolicy, CacheReport, CacheStep, ModelCache
from attnlab.errors import InputError
from attnlab.infer.inputs import PAD_ID, check_chunk_size, check_prompts

log = logging.getLogger(__name__)


class DecodeRuntime:
    """Decode state of ``batch`` sequences of up to ``max_length`` tokens each (default: the
    model's block_size). ``cuda_graphs``: capture ``step`` in a CUDA graph (default: on CUDA)."""

    def __init__(self, model, policy: CachePolicy | str | dict | None = None, *, batch: int = 1,
                 max_length: int | None = None, cuda_graphs: bool | None = None, compile: bool = False):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InputError(f"runtime batch must be an integer >= 1, got {batch!r}")
        max_length = model.config.block_size if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise InputError(f"runtime max_length must be an integer >= 1, got {max_length!r}")
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.policy = CachePolicy.parse(policy)
        self.max_length = max_length
        self.cache = ModelCache.for_model(model, self.policy, batch=batch, capacity=max_length)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)  # (B,) device
        self._host_lengths = [0] * batch
        want_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if want_graphs and self.device.type != "cuda":
            raise InputError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = want_graphs
        self.compile = compile
        self._compiled = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_tokens: torch.Tensor | None = None
        self._graph_logits: torch.Tensor | None = None
        self._graph_inputs: tuple[torch.Tensor, ...] = ()

    # ------------------------------------------------------------------ state
    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def host_lengths(self) -> list[int]:
        """Tokens each sequence holds (the host mirror; no device sync)."""
        return list(self._host_lengths)

    def reset(self) -> None:
        """Forget every sequence (storage and any captured graph stay)."""
        self.set_lengths([0] * self.batch)

    def set_lengths(self, lengths: list[int]) -> None:
        self._host_lengths = list(lengths)
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32), non_blocking=False)

    def truncate(self, lengths: int | list[int]) -> None:
        """Roll back to ``lengths`` tokens (speculative decoding). Stored rows are never touched;
        the exact tail is checked to still hold the newest tokens."""
        new = [lengths] * self.batch if isinstance(lengths, int) else list(lengths)
        if len(new) != self.batch:
            raise InputError(f"truncate: {len(new)} lengths for a batch of {self.batch}")
        for b, (old, n) in enumerate(zip(self._host_lengths, new)):
            if not 0 <= n <= old:
                raise InputError(f"truncate: sequence {b} has {old} tokens; cannot set length {n}")
        self.cache.check_rollback(new)
        self.set_lengths(new)

    def report(self) -> CacheReport:
        return self.cache.report(max(self._host_lengths))

    def _check_room(self, new_tokens: list[int]) -> None:
        for b, (have, n) in enumerate(zip(self._host_lengths, new_tokens)):
            if have + n > self.max_length:
                raise InputError(f"sequence {b} would hold {have + n} tokens; this runtime was built for "
                                 f"max_length={self.max_length} (prompt plus new tokens)")

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, valid: list[int] | None = None) -> torch.Tensor:
        """Append ``ids`` (B, T) — the first ``valid[b]`` of row b are real, the rest right
        padding — to the cached sequences and return logits (B, T, V). Eager."""
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise InputError(f"this runtime decodes {self.batch} sequences; got input of shape {tuple(ids.shape)}")
        t_len = ids.shape[1]
        valid = [t_len] * self.batch if valid is None else list(valid)
        if len(valid) != self.batch or any(not 0 <= n <= t_len for n in valid):
            raise InputError(f"valid counts {valid} must lie in 0..{t_len}, one per sequence")
        self._check_room(valid)
        step = CacheStep.eager(self._host_lengths, valid, t_len, self.device)
        logits = self.model(ids.to(self.device), cache=self.cache, step=step)
        self._advance(valid, step.lengths)
        return logits

    def _advance(self, valid: list[int], lengths: torch.Tensor) -> None:
        self._host_lengths = [n + v for n, v in zip(self._host_lengths, valid)]
        self.lengths.copy_(lengths)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], chunk_size: int | None = None) -> torch.Tensor:
        """Feed prompts (of different lengths) in right-padded chunks of ``chunk_size`` tokens
        (default block_size); returns the logits after each prompt's last token, (B, V). The
        sequences may already hold tokens: prompts continue them."""
        prompts = check_prompts(self.model, prompts)
        chunk = check_chunk_size(self.model, chunk_size)
        if len(prompts) != self.batch:
            raise InputError(f"this runtime decodes {self.batch} sequences, got {len(prompts)} prompts")
        lengths = [len(p) for p in prompts]
        self._check_room(lengths)
        longest = max(lengths)
        padded = torch.full((self.batch, longest), PAD_ID, dtype=torch.long)
        for b, p in enumerate(prompts):
            padded[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        padded = padded.to(self.device)
        last: list[torch.Tensor | None] = [None] * self.batch
        for start in range(0, longest, chunk):
            width = min(chunk, longest - start)
            valid = [min(max(n - start, 0), width) for n in lengths]
            logits = self.forward(padded[:, start: start + width], valid)  # (B, width, V)
            for b, n in enumerate(lengths):
                if start < n <= start + width:  # this chunk holds prompt b's last token
                    last[b] = logits[b, n - 1 - start]
        return torch.stack(last)  # (B, V)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per sequence (``tokens`` (B,) or (B, 1), on any device): logits (B, V).
        Replays the captured CUDA graph when graphs are on (the returned tensor is the graph's
        output buffer: it is overwritten by the next step)."""
        if tokens.numel() != self.batch or tokens.dim() > 2:
            raise InputError(f"this runtime decodes {self.batch} sequences; step got tokens of shape "
                             f"{tuple(tokens.shape)} (one token per sequence: (B,) or (B, 1))")
        tokens = tokens.reshape(self.batch, 1)
        self._check_room([1] * self.batch)
        if self.cuda_graphs and self._ensure_graph():
            self._graph_tokens.copy_(tokens, non_blocking=True)
            self._graph.replay()
            self._host_lengths = [n + 1 for n in self._host_lengths]
            return self._graph_logits
        step = self._device_step(with_host=not self.compile)
        logits = self._step_model(tokens.to(self.device), step)
        self._advance([1] * self.batch, step.lengths)
        return logits

    def _step_model(self, tokens: torch.Tensor, step: CacheStep) -> torch.Tensor:
        """Logits (B, V) of one decode step, compiled when ``compile`` is on."""
        if not self.compile:
            return self.model(tokens, cache=self.cache, step=step)[:, -1]
        from attnlab.kernels.ops import active_cache

        if self._compiled is None:
            self._compiled = torch.compile(self.model, fullgraph=True, dynamic=False)
        with active_cache(self.cache, step.max_length):
            return self._compiled(tokens, cache=self.cache, step=step)[:, -1]

    def _device_step(self, *, with_host: bool, lengths_out: torch.Tensor | None = None,
                     positions_out: torch.Tensor | None = None) -> CacheStep:
        """The decode step at the current device lengths: offsets = lengths, one valid token."""
        ones = torch.ones_like(self.lengths)
        if lengths_out is None:
            lengths_out = self.lengths + 1
        else:
            torch.add(self.lengths, 1, out=lengths_out)
        if positions_out is None:
            positions_out = self.lengths.to(torch.long).unsqueeze(1)
        else:
            positions_out.copy_(self.lengths.unsqueeze(1))
        host = (self.host_lengths, [1] * self.batch) if with_host else (None, None)
        max_length = max(self._host_lengths) + 1 if with_host else self.max_length
        return CacheStep(self.lengths, ones, lengths_out, positions_out, max_length, *host)

    # ------------------------------------------------------------------ CUDA graphs
    def graph_unsupported_reason(self) -> str | None:
        """Why ``step`` cannot be captured (a layer falls back to a torch path that needs the
        host); None when it can."""
        from attnlab.kernels import kernel_unsupported_reason

        for i, (layer, cache) in enumerate(zip(self.model.attention_layers(), self.cache.layers)):
            if getattr(cache, "device_side_decode", False):  # torch ops on device positions only
                continue
            q = [torch.empty(self.batch, layer.dims.num_heads, 1, f.head_dim, device=self.device, dtype=cache.dtype)
                 for f in layer.dims.key_fields]
            null_k, _ = layer.null_kv()
            reason = kernel_unsupported_reason(q, cache, null_k=null_k)
            if reason is not None:
                return f"layer {i}: {reason}"
        return None

    def _ensure_graph(self) -> bool:
        if self._graph is not None:
            return True
        reason = self.graph_unsupported_reason()
        if reason is not None:
            log.warning("decode steps run eagerly (no CUDA graph): %s", reason)
            self.cuda_graphs = False
            return False
        saved = self.host_lengths
        b = self.batch
        # every tensor the graph reads or writes that is allocated outside the capture must live
        # as long as the graph: a freed one would be handed to other tensors that replays then
        # overwrite (seen on the H200: tokens clobbered by next_lengths)
        self._graph_tokens = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        next_lengths = torch.empty_like(self.lengths)
        positions = torch.empty(b, 1, dtype=torch.long, device=self.device)
        self._graph_inputs = (next_lengths, positions)

        def run() -> torch.Tensor:
            step = self._device_step(with_host=False, lengths_out=next_lengths, positions_out=positions)
            logits = self._step_model(self._graph_tokens, step)
            self.lengths.copy_(next_lengths)
            return logits

        # warm up on a side stream (Triton compiles, kernel plans and scratch are made), then
        # capture; the warm-up writes rows past each length, which nothing reads
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
                self.set_lengths(saved)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = run()
        self._graph = graph
        self.set_lengths(saved)  # capture recorded the length update without running it
        return True


__all__ = ["DecodeRuntime"]
