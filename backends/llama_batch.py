"""Continuous batching over llama.cpp's C API: many sequences, one `llama_decode` per step.

One `llama_context` holds `parallel` sequences (`n_seq_max`), each with its own
`context_length` cells (the KV cache is not unified: the context has context_length x parallel
cells, so one sequence can never starve another). Each step builds one `llama_batch` ordered
by sequence id (llama.cpp groups consecutive ids) with the next token of every running
sequence plus prompt tokens of newly admitted ones: while others generate, the batch's share
of the sequences still computing their prompts, at least `prompt_chunk`, so a long prompt
cannot stall the running streams for long (`_prompt_budget`). Every request samples with its
own sampler chain (grammar, penalties, top-k/top-p/min-p/temperature and a seeded dist, or
greedy).

A prompt prefix that several sequences share is computed once (`_share`, see
docs/continuous-batching.md): a new sequence copies the cells another slot holds for its
leading tokens, or waits for the sequence still computing them and then copies; only within
one cache scope (the API key by default).

The running ids are kept consecutive: llama.cpp decodes each run of consecutive ids as its
own sub-batch, so every gap costs every step one more pass over the weights (4 sequences at ids
0,2,5,7 took 23 ms a step against 14 ms at 0-3). A new sequence takes a free slot that fills
a gap or extends the running block (of those, the one where it reuses more cached tokens than
it evicts, else the least recently used), unless another free slot's cached tokens share at least
REUSE_MIN more leading tokens with its prompt (a chat's earlier turns, a long system prompt);
the cells after the first mismatch are removed. A finished sequence's cells stay with its slot
for that reuse; a cancelled one's are removed. When sequences finish out of order and nothing
waits to fill the gap, the sequences outside the fullest window of ids move into its free
ids (`llama_memory_seq_cp` copies a sequence's whole KV stream), if they still have enough
tokens to generate for the copy to pay off (`move_steps`).

Greedy sequences (temperature 0, no penalties, no grammar) need no sampler chain: one numpy
argmax over the logits of every output row of the step picks all their tokens at once, the
same first-highest token llama.cpp's greedy sampler picks, without a chain call per sequence
(each fills a candidate array of the whole vocabulary).
"""

from __future__ import annotations

import ctypes
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends.base import BatchEngine, Chunk, GenerationRequest, TokenLogprob
from backends.errors import BackendFailure, ContextLengthExceeded, ModelLoadError
from backends.grammar import grammar_for, grammar_sampler
from backends.text import StopMatcher, Utf8Stream, common_prefix

if TYPE_CHECKING:
    from backends.llama import LlamaBackend

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64
REUSE_MIN = 32  # shared prompt tokens that make a slot other than the lowest free one worth it

#: Calls of the step loop that take microseconds: made through twins that keep the GIL.
#: ctypes releases the GIL around every foreign call; after each release the engine thread
#: must win the GIL back from the event loop (which may be busy sending the last step's
#: tokens), and those waits lay on the critical path between two `llama_decode` calls.
QUICK_CALLS = ("llama_sampler_sample", "llama_vocab_is_eog", "llama_get_logits_ith",
               "llama_get_logits", "llama_memory_seq_rm", "llama_sampler_free")


#: Of those, calls whose pointer result is wanted as a plain address (an int).
ADDRESS_CALLS = ("llama_get_logits",)


def gil_holding(lib: Any, names: tuple[str, ...]) -> Any:
    """A namespace of `names` from llama.cpp's shared library, called without releasing
    the GIL (`ctypes.PyDLL`), with the argument and result types llama-cpp-python declared;
    the library module itself (GIL-releasing calls) if its loaded library cannot be found."""
    shared = getattr(getattr(lib, "llama_cpp", None), "_lib", None)
    if not isinstance(shared, ctypes.CDLL):
        log.warning("llama-cpp-python's shared library not found; per-token calls release "
                    "the GIL")
        return lib
    twin = ctypes.PyDLL(shared._name, handle=shared._handle)
    calls = {}
    for name in names:
        declared, fn = getattr(lib, name), getattr(twin, name)
        fn.argtypes, fn.restype = declared.argtypes, declared.restype
        if name in ADDRESS_CALLS:
            fn.restype = ctypes.c_void_p
        calls[name] = fn
    return type("QuickCalls", (), calls)


@dataclass
class Sequence:
    key: int
    prompt: int  # prompt tokens
    tokens: list[int]  # the whole prompt, matched against other sequences' cells
    max_tokens: int
    sampler: Any  # the request's sampler chain; None: greedy, picked by the step's argmax
    stops: StopMatcher
    logprobs: int | None
    todo: list[int]  # tokens to feed next (the prompt's rest, then the last sampled one)
    text: Utf8Stream = field(default_factory=Utf8Stream)
    count: int = 0  # tokens generated; > 0: `todo` holds just the last sampled one
    row: int = -1  # batch row of this step's output, -1: none
    output: int = -1  # its index among the step's output rows (llama_get_logits order)
    early: list[Chunk] = field(default_factory=list)  # chunks to send at the next step
    sample: Any = None  # llama_sampler_sample: GIL-releasing with a grammar (ms per token)
    cached: int = 0  # prompt tokens whose cells were reused or copied, not computed
    donor: Sequence | None = None  # the sequence computing this one's prefix: wait for it
    wait_for: int = 0  # ... until its cells hold this many of our prompt's tokens
    scope: str | None = None  # GenerationRequest.cache_scope: shares cells only within it


@dataclass
class Slot:
    id: int
    cached: list[int] = field(default_factory=list)  # tokens whose cells the KV cache holds
    seq: Sequence | None = None
    used: int = 0  # the engine's admission count when a sequence last took or left it (LRU)
    scope: str | None = None  # the cache_scope of the sequence whose cells it holds


class LlamaBatchEngine(BatchEngine):
    """A `BatchEngine` over a loaded LlamaBackend's model (its own context)."""

    calls_before_decode = True

    def __init__(self, backend: LlamaBackend, parallel: int, prompt_chunk: int,
                 prompt_batch: int, flash_attn: bool | str, n_threads: int | None,
                 n_threads_batch: int | None, share_prefixes: bool = True) -> None:
        import llama_cpp as lib

        self._lib = lib
        self._quick = gil_holding(lib, QUICK_CALLS)
        self._backend = backend
        self.max_sequences = parallel
        self.prompt_chunk = prompt_chunk
        self.context_length = backend.context_length
        params = lib.llama_context_default_params()
        params.n_ctx = self.context_length * parallel
        params.n_seq_max = parallel
        # A prompt is fed `prompt_chunk` tokens a step while other sequences generate, and up
        # to a whole batch (at least `prompt_batch` tokens, n_batch) when none do.
        self._batch_size = max(prompt_chunk, prompt_batch) + parallel
        params.n_batch = params.n_ubatch = self._batch_size
        if n_threads:
            params.n_threads = n_threads
            params.n_threads_batch = n_threads_batch or n_threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn == "auto" else \
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = lib.llama_init_from_model(backend.model_pointer, params)
        if not self._ctx:
            raise ModelLoadError("llama.cpp could not create the batching context "
                                 f"({parallel} sequences x {self.context_length} tokens)")
        self.context_length = min(self.context_length, int(lib.llama_n_ctx_seq(self._ctx)))
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = batch = lib.llama_batch_init(params.n_batch, 0, 1)
        # The batch's arrays, fetched once (each attribute read builds a new ctypes pointer);
        # every row names one sequence, so n_seq_id is set once.
        self._tokens, self._pos, self._outputs = batch.token, batch.pos, batch.logits
        self._row_seq = [batch.seq_id[i] for i in range(params.n_batch)]
        for i in range(params.n_batch):
            batch.n_seq_id[i] = 1
        self._n_vocab = lib.llama_vocab_n_tokens(backend.vocab)
        self._outputs_n = 0  # output rows of the current step
        self._view: tuple[tuple[int, int], Any] = ((0, 0), None)  # (address, rows), numpy view
        self._eog: dict[int, bool] = {}  # token -> end of generation (llama_vocab_is_eog)
        self.slots = [Slot(i) for i in range(parallel)]
        self._running: list[Slot] = []  # slots with a sequence, in id order (_index_running)
        self._by_key: dict[int, Slot] = {}
        self.share_prefixes = share_prefixes
        self.reused_tokens = 0  # prompt tokens whose cells came from a slot's cache or a copy
        self.copies = 0  # prompt prefixes copied from another sequence instead of computed
        self.computed_tokens = 0  # prompt tokens decoded
        self.moves = 0  # sequences moved to close a gap in the running ids
        self._admissions = 0  # clock of the slots' last use
        self.move_steps = self._steps_to_repay_a_move(backend.model_pointer)

    def _steps_to_repay_a_move(self, model: Any) -> int:
        """Steps a sequence must still run for moving it to pay off. A move copies one
        sequence's whole KV stream (read and write, f16 K and V of every cell of every layer);
        a gap costs each step one more sub-batch, about one more read of the weights."""
        lib = self._lib
        heads = max(1, int(lib.llama_model_n_head(model)))
        kv_width = int(lib.llama_model_n_embd(model) * lib.llama_model_n_head_kv(model)) // heads
        stream = 2 * int(lib.llama_model_n_layer(model)) * self.context_length * kv_width * 2
        weights = max(1, int(lib.llama_model_size(model)))
        return max(1, math.ceil(2 * stream / weights))

    # -- admission -------------------------------------------------------------------------

    def admit(self, key: int, request: GenerationRequest) -> Chunk:
        params = request.params
        tokens = self._backend.prompt_tokens(request)
        grammar = grammar_for(params)
        room = self.context_length - len(tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room or room <= 0:
            raise ContextLengthExceeded(
                prompt_tokens=len(tokens), max_tokens=max(max_tokens, 1),
                context_length=self.context_length, sequences=self.max_sequences)
        greedy = params.temperature <= 0 and grammar is None and not _penalised(params)
        sampler = None if greedy else self._sampler(params, grammar)
        slot, shared = self._pick_slot(tokens, request.cache_scope)
        reuse = min(shared, len(tokens) - 1)
        self._quick.llama_memory_seq_rm(self._mem, slot.id, reuse, -1)
        del slot.cached[reuse:]
        self.reused_tokens += reuse
        seq = Sequence(key=key, prompt=len(tokens), tokens=tokens, max_tokens=max_tokens,
                       sampler=sampler, stops=StopMatcher(params.stop),
                       logprobs=params.logprobs, todo=tokens[reuse:], cached=reuse,
                       scope=request.cache_scope,
                       sample=self._lib.llama_sampler_sample if grammar is not None
                       else self._quick.llama_sampler_sample)
        if params.echo and request.prompt:
            seq.early.append(Chunk(text=request.prompt))
        slot.seq, slot.scope = seq, seq.scope
        self._touch(slot)
        self._by_key[key] = slot
        self._index_running()
        if self.share_prefixes:
            self._share(slot, seq)
        return Chunk(prompt_tokens=len(tokens))

    def _touch(self, slot: Slot) -> None:
        self._admissions += 1
        slot.used = self._admissions

    def _index_running(self) -> None:
        """Rebuild (never mutate: `step` may be iterating it) the id-ordered running slots."""
        self._running = [s for s in self.slots if s.seq is not None]

    def _pick_slot(self, tokens: list[int], scope: str | None) -> tuple[Slot, int]:
        """Of the free slots that keep the running ids consecutive, the one where the
        prompt reuses more cached tokens than it evicts, else the least recently used (its
        cached prefix is the one least likely to be asked for again) — unless another free
        slot's cache shares at least REUSE_MIN more: a gap costs every step of every stream
        (or a move of a whole KV stream), while a short shared prefix saves a few prompt
        tokens once. Returns the slot and how many leading tokens its cache shares."""
        near = self._adjacent_free()
        shared = [(common_prefix(slot.cached, tokens) if slot.scope == scope else 0, slot)
                  for slot in self.slots if slot.seq is None]
        # reused minus evicted cached tokens, then the least recently used
        baseline = max((pair for pair in shared if pair[1] in near),
                       key=lambda pair: (2 * pair[0] - len(pair[1].cached), -pair[1].used,
                                         -pair[1].id))
        best = max(shared, key=lambda pair: (pair[0], -pair[1].id))
        chosen = best if best[0] - baseline[0] >= REUSE_MIN else baseline
        return chosen[1], chosen[0]

    def _adjacent_free(self) -> list[Slot]:
        """The free slots that keep the running ids consecutive: those in a gap, else the
        ones just below and just above them; all when none runs."""
        running = self._running
        if not running:
            return [slot for slot in self.slots if slot.seq is None]
        low, high = running[0].id, running[-1].id
        near = [s for s in self.slots[low:high] if s.seq is None]
        return near or [self.slots[i] for i in (low - 1, high + 1) if 0 <= i < len(self.slots)]

    # -- shared prefixes -------------------------------------------------------------------

    def _share(self, slot: Slot, seq: Sequence) -> None:
        """Give a sequence that has yet to compute its prompt the cells of its leading tokens
        that another slot holds (a running sequence, or a finished one's cache): copied when
        they are at least REUSE_MIN more than its own slot holds. When a sequence still in
        prefill will hold REUSE_MIN more than that, wait for it instead (`donor`): the first
        of many requests with a common prefix computes it, the others then copy it and
        compute only their own tails."""
        seq.donor = None
        have = len(slot.cached)
        limit = seq.prompt - 1  # the last prompt token is always fed: its logits are sampled
        now, source = have, None
        later, donor = have, None
        for other in self.slots:
            if other is slot or other.scope != seq.scope:
                continue
            done = min(common_prefix(other.cached, seq.tokens), limit)
            if done > now:
                now, source = done, other
            feeding = other.seq
            if feeding is not None and feeding.todo and not feeding.count \
                    and feeding.donor is None:
                planned = min(common_prefix(feeding.tokens, seq.tokens), limit)
                if planned > later:
                    later, donor = planned, feeding
        if donor is not None and later - now >= REUSE_MIN:
            seq.donor, seq.wait_for = donor, later
        elif source is not None and now - have >= REUSE_MIN:
            self._copy(source, slot, seq, now)

    def _copy(self, source: Slot, slot: Slot, seq: Sequence, n: int) -> None:
        """Give `slot` the first n cells of `source`. Across KV streams llama.cpp copies a
        whole stream, at the next decode before that step's batch is placed (so the source
        may take new tokens in the same step); the cells past n are dropped at once."""
        self._lib.llama_memory_seq_cp(self._mem, source.id, slot.id, -1, -1)
        self._quick.llama_memory_seq_rm(self._mem, slot.id, n, -1)
        self.reused_tokens += n - len(slot.cached)
        self.copies += 1
        slot.cached = source.cached[:n]
        seq.todo = seq.tokens[n:]
        seq.cached = n
        if source.seq is None:
            self._touch(source)

    def _resolve_waiting(self, running: list[Slot]) -> None:
        """Sequences waiting for a donor: copy once it holds the prefix (or find another
        source, or compute themselves, when it went away)."""
        for slot in running:
            seq = slot.seq
            donor = seq.donor if seq is not None else None
            if seq is None or donor is None:
                continue
            at = self._by_key.get(donor.key)
            if at is not None and at.seq is donor and donor.todo and not donor.count \
                    and len(at.cached) < seq.wait_for:
                continue  # still computing our prefix
            self._share(slot, seq)

    def _compact(self) -> None:
        """Make the running ids consecutive again after sequences finished out of order:
        choose the window of ids holding the most running sequences and move the others into
        its free slots, each only if it may still run `move_steps` steps. The moved
        sequence's old slot keeps a copy of its cells for prefix reuse."""
        running = self._running
        n = len(running)
        if n < 2 or running[-1].id - running[0].id == n - 1:
            return
        ids = {slot.id for slot in running}
        start = max(range(len(self.slots) - n + 1),
                    key=lambda a: (sum(i in ids for i in range(a, a + n)), -a))
        free = [self.slots[i] for i in range(start, start + n) if i not in ids]
        outside = [s for s in running if not start <= s.id < start + n]
        for src, dst in zip(outside, free, strict=True):
            seq = src.seq
            assert seq is not None
            if seq.max_tokens - seq.count + len(seq.todo) - 1 < self.move_steps:
                continue  # ends soon: the gap closes by itself
            if src.cached:  # copied at the next decode, before its batch is placed
                self._lib.llama_memory_seq_cp(self._mem, src.id, dst.id, -1, -1)
            else:
                self._quick.llama_memory_seq_rm(self._mem, dst.id, -1, -1)
            dst.cached, src.cached = src.cached, list(src.cached)
            dst.scope = src.scope
            dst.seq, src.seq = seq, None
            self._by_key[seq.key] = dst
            self.moves += 1
        self._index_running()

    def _sampler(self, params: Any, grammar: str | None) -> Any:
        lib = self._lib
        # First, so that a grammar llama.cpp rejects (a 400) leaves no chain behind.
        constrain = None if grammar is None else \
            grammar_sampler(lib, self._backend.vocab, grammar)
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            lib.llama_sampler_chain_add(chain, sampler)

        if _penalised(params):
            add(lib.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N,
                                                 params.repeat_penalty,
                                                 params.frequency_penalty,
                                                 params.presence_penalty))
        if constrain is not None:
            add(constrain)
        if params.temperature <= 0:
            add(lib.llama_sampler_init_greedy())
            return chain
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        add(lib.llama_sampler_init_top_k(params.top_k))
        add(lib.llama_sampler_init_top_p(params.top_p, 1))
        add(lib.llama_sampler_init_min_p(params.min_p, 1))
        add(lib.llama_sampler_init_temp(params.temperature))
        add(lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    # -- stepping --------------------------------------------------------------------------

    def active(self) -> int:
        return len(self._by_key)

    def step(self) -> list[tuple[int, Chunk | Any]]:
        out: list[tuple[int, Chunk | Any]] = []
        self._compact()
        running = self._running  # admit/retire build a new list: safe to iterate
        if self.share_prefixes:
            self._resolve_waiting(running)
        for slot in running:
            seq = slot.seq
            assert seq is not None
            if seq.early:
                out.extend((seq.key, chunk) for chunk in seq.early)
                seq.early.clear()
        filled = self._fill(running)
        self.before_decode()
        if filled:
            status = self._lib.llama_decode(self._ctx, self._batch)
            if status != 0:
                log.error("llama_decode failed with status %s", status)
                raise BackendFailure()
        picks = self._greedy_picks(running) if filled else []
        for slot in running:
            seq = slot.seq
            if seq is not None and seq.row >= 0:
                self._sample(slot, seq, out, picks)
        return out

    def _greedy_picks(self, running: list[Slot]) -> list[int]:
        """The highest-logit token of every output row of the step (by output index), when a
        greedy sequence has a row; else nothing."""
        if not any(s.seq is not None and s.seq.sampler is None and s.seq.row >= 0
                   for s in running):
            return []
        address = self._quick.llama_get_logits(self._ctx)  # rows in batch order
        if not isinstance(address, int):  # the GIL-releasing fallback: a ctypes pointer
            address = ctypes.cast(address, ctypes.c_void_p).value
        key = (address, self._outputs_n)
        cached, view = self._view
        if cached != key:  # the buffer moved or the step has another number of rows
            import numpy as np

            cells = (ctypes.c_float * (self._outputs_n * self._n_vocab)).from_address(address)
            view = np.frombuffer(cells, dtype=np.float32).reshape(self._outputs_n, self._n_vocab)
            self._view = (key, view)
        picks: list[int] = view.argmax(axis=1).tolist()
        return picks

    def _fill(self, running: list[Slot]) -> int:
        """Put this step's tokens into the batch, by slot id; returns how many. A generating
        sequence puts its last sampled token; a new one the next part of its prompt."""
        tokens, positions, outputs, row_seq = self._tokens, self._pos, self._outputs, \
            self._row_seq
        budget = -1  # prompt tokens this step may still take; -1: not yet known
        n = outputs_n = 0
        for slot in running:  # in id order
            seq = slot.seq
            assert seq is not None
            cached = slot.cached
            if seq.count:
                token = seq.todo[0]
                tokens[n] = token
                positions[n] = len(cached)
                row_seq[n][0] = slot.id
                outputs[n] = True
                cached.append(token)
                seq.row, seq.output = n, outputs_n
                outputs_n += 1
                n += 1
                continue
            if seq.donor is not None:  # waits for another sequence's prefix
                seq.row = -1
                continue
            if budget < 0:
                budget = self._prompt_budget(running)
            take = min(len(seq.todo), budget)
            budget -= take
            self.computed_tokens += take
            seq.row = -1
            for token in seq.todo[:take]:
                tokens[n] = token
                positions[n] = len(cached)
                row_seq[n][0] = slot.id
                outputs[n] = False
                cached.append(token)
                n += 1
            del seq.todo[:take]
            if take and not seq.todo:
                outputs[n - 1] = True
                seq.row, seq.output = n - 1, outputs_n
                outputs_n += 1
        self._batch.n_tokens = n
        self._outputs_n = outputs_n
        return n

    def _prompt_budget(self, running: list[Slot]) -> int:
        """Prompt tokens this step: a whole batch when nothing generates; else the batch's
        share of the sequences still computing their prompts, at least `prompt_chunk` — one
        long prompt among many streams stalls them little, while a burst of new prompts
        behind one stream is not fed a chunk at a time."""
        generating = prefilling = 0
        for slot in running:
            seq = slot.seq
            if seq is not None:
                if seq.count:
                    generating += 1
                elif seq.donor is None:
                    prefilling += 1
        if not generating:
            return self._batch_size
        share = self._batch_size * prefilling // (prefilling + generating)
        return max(self.prompt_chunk, share)

    def _sample(self, slot: Slot, seq: Sequence, out: list[tuple[int, Chunk | Any]],
                picks: list[int]) -> None:
        token = picks[seq.output] if seq.sampler is None else \
            seq.sample(seq.sampler, self._ctx, seq.row)
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self._quick.llama_vocab_is_eog(
                self._backend.vocab, token))
        if eog:
            self._retire(slot, seq, "stop", out)
            return
        seq.count += 1
        text = seq.text.push(self._backend.piece(token))
        hit_stop = False
        if seq.stops.stops:
            text, hit_stop = seq.stops.push(text)
        if seq.logprobs is None:
            out.append((seq.key, Chunk(text)))
        else:
            scored = (self._logprob(seq.row, token, seq.logprobs),)
            out.append((seq.key, Chunk(text=text, logprobs=scored)))
        if hit_stop:
            self._retire(slot, seq, "stop", out, flush=False)
        elif seq.count >= seq.max_tokens:
            self._retire(slot, seq, "length", out)
        else:
            seq.todo = [token]

    def _logprob(self, row: int, token: int, top: int) -> TokenLogprob:
        logits = self._quick.llama_get_logits_ith(self._ctx, row)
        return self._backend.score(logits, token, top)

    def _retire(self, slot: Slot, seq: Sequence, finish: str,
                out: list[tuple[int, Chunk | Any]], flush: bool = True) -> None:
        if flush:
            tail, _ = seq.stops.push(seq.text.flush())
            if tail := tail + seq.stops.flush():
                out.append((seq.key, Chunk(text=tail)))
        out.append((seq.key, Chunk(finish_reason=finish, prompt_tokens=seq.prompt,
                                   completion_tokens=seq.count, cached_tokens=seq.cached)))
        self._free(slot, keep_cache=True)
        self._touch(slot)

    def cancel(self, key: int) -> None:
        slot = self._by_key.get(key)
        if slot is not None:
            self._free(slot, keep_cache=False)

    def _free(self, slot: Slot, keep_cache: bool) -> None:
        seq = slot.seq
        assert seq is not None
        if seq.sampler is not None:
            self._quick.llama_sampler_free(seq.sampler)
        del self._by_key[seq.key]
        slot.seq = None
        self._index_running()
        if not keep_cache:
            self._quick.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
            slot.cached.clear()

    # -- inspection and teardown -----------------------------------------------------------

    def clear_cache(self) -> None:
        """Forget every free slot's cached prefix (running sequences keep theirs)."""
        for slot in self.slots:
            if slot.seq is None and slot.cached:
                self._quick.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
                slot.cached.clear()

    def kv_positions(self) -> list[tuple[int, int]]:
        """Per slot: (the KV cache's highest position of its sequence, cached tokens - 1);
        equal pairs mean the cache holds exactly what the slot believes (-1: empty)."""
        return [(int(self._lib.llama_memory_seq_pos_max(self._mem, s.id)), len(s.cached) - 1)
                for s in self.slots]

    def close(self) -> None:
        for slot in self.slots:
            if slot.seq is not None:
                self._free(slot, keep_cache=False)
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None


def _penalised(params: Any) -> bool:
    return bool(params.repeat_penalty != 1.0 or params.presence_penalty
                or params.frequency_penalty)
