"""Data parallelism under torchrun: which process this is, the process group, and the agreements that stop every
process at once when one of them fails.

    torchrun --nproc_per_node 8 train.py --data imagenet --device cuda      # one run on 8 GPUs (docs/distributed.md)

The method's part is in train.py, in plain view: each process takes its slice of each global batch
(data.train_batches), weighs its loss by its share of the batch, and sums the trainables' gradients with one
`all_reduce` each (the sum of the shares' gradients is the global batch's gradient, JAX's `pmean`); evaluation sums
the correct counts. This module holds the rest. torchrun says who we are through RANK, WORLD_SIZE and LOCAL_RANK;
without them (a plain `python train.py`) this is process 0 of 1, no group is started and every function here is a
no-op, so that the single-process program is exactly what it was.

Faults. A process that stops while the others wait in a collective would leave them waiting until the group's
timeout. So the points where processes can diverge (reading and checking the data, loading the model, reading each
step's images, evaluating) run inside `together`: at its end every process learns whether one failed in it, and all
stop with one line. A process that dies outright (killed, out of memory in a step) is seen by the others as a broken
collective, which `session` turns into one line; torchrun also ends the other processes when one exits non-zero.
"""

import datetime
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

TIMEOUT_S = 600  # a collective that waits longer stops the run: a peer has hung (the first model download counts)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for each process it starts


# ---------------------------------------------------------------------------------------------------- who we are

def launched():
    """True when torchrun started this process as one of several."""
    return all(name in os.environ for name in LAUNCH_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def rank():
    """This process's number, 0 to size() - 1 (0 without torchrun)."""
    return int(os.environ["RANK"]) if launched() else 0


def size():
    """How many processes train this run (1 without torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def local_rank():
    """This process's number on its machine: the GPU it uses."""
    return int(os.environ["LOCAL_RANK"]) if launched() else 0


def main_process():
    """The process that writes (the lock, the records, checkpoints, the log) and speaks: rank 0."""
    return rank() == 0


def active():
    """True once the process group is started: the collectives in train.py run only then."""
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------------------------------------- the group

def start(device, timeout_s=TIMEOUT_S):
    """Join torchrun's process group (nothing without torchrun); returns the device this process uses: --device
    cuda becomes cuda:LOCAL_RANK (NCCL for the GPU's tensors, gloo for the CPU's), the CPU uses gloo."""
    if not launched() or active():
        return device
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.device(device).index is not None:
            _stop(f"--device {device} under torchrun: give --device cuda, each process takes cuda:LOCAL_RANK")
        if local_rank() >= torch.cuda.device_count():
            _stop(f"process {rank()} has LOCAL_RANK {local_rank()}, but this machine shows "
                  f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes per node")
        device = f"cuda:{local_rank()}"
        torch.cuda.set_device(device)
    elif kind != "cpu":
        _stop(f"--device {device} under torchrun: data parallelism runs on cuda (NCCL) or cpu (gloo)")
    backend = "cpu:gloo,cuda:nccl" if kind == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def stop():
    """Leave the process group (at the end, or on the way out after a fault)."""
    if active():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- agreement

def agree(problem=None):
    """Every process says whether it failed (`problem`: its one-line reason, or None); returns the first failed
    process's (rank, reason), or None when all are fine. A collective: every process must call it."""
    if not active():
        return None if problem is None else (0, problem)
    failed = torch.tensor([problem is not None], dtype=torch.int32)  # a CPU tensor: gloo, on either backend
    dist.all_reduce(failed)
    if not failed.item():
        return None
    reasons = [None] * size()
    dist.all_gather_object(reasons, problem)  # only on the way out: the reasons' text
    first = next(r for r, reason in enumerate(reasons) if reason is not None)
    return first, reasons[first]


def any_process(flag):
    """True on every process when `flag` is true on any one (a Ctrl-C that reached only some of them)."""
    if not active():
        return bool(flag)
    flags = torch.tensor([bool(flag)], dtype=torch.int32)
    dist.all_reduce(flags)
    return bool(flags.item())


@contextmanager
def together():
    """A block that every process runs, at whose end all learn whether one failed in it: the one that failed goes
    on failing (its own one line), the others stop with one line naming it. Without torchrun, just the block."""
    if not active():
        yield
        return
    try:
        yield
    except (Exception, SystemExit) as error:
        agree(_one_line(error))
        raise  # this process's own message (a DataError, an `error: ...` exit): what the single process says
    outcome = agree(None)
    if outcome is not None:
        failed, reason = outcome
        _stop(f"process {failed} of {size()} stopped ({reason}); this process (rank {rank()}) stops with it")


def each_together(iterable):
    """The items of `iterable` (this process's share), each fetched inside `together`: a bad image that one process
    reads stops every process before the step's collectives. Processes with fewer items wait for the others: the
    loop ends when every process's share is exhausted."""
    if not active():
        yield from iterable
        return
    items = iter(iterable)
    while True:
        with together():
            item = next(items, _END)
        if not any_process(item is not _END):
            return
        if item is not _END:
            yield item


_END = object()


@contextmanager
def node_first():
    """A block that the first process of each machine runs before the others: downloads (data, model) happen once
    per machine, and the others read what it wrote. Failures in it are agreed (`together`)."""
    if not active():
        yield
        return
    first = local_rank() == 0
    if not first:
        with together():  # wait for this machine's first process
            pass
    with together():
        yield
    if first:
        with together():  # let the others run the block
            pass


@contextmanager
def session(device, timeout_s=TIMEOUT_S):
    """The process group for a block (`start`; it yields the device), left at its end. A collective that fails
    inside, because another process died or the timeout passed, is one line rather than a traceback (the process
    that failed says why). Without torchrun: the device, nothing else."""
    device = start(device, timeout_s)
    try:
        yield device
    except (RuntimeError, dist.DistError) as error:
        if not active() or not _collective_error(error):
            raise
        _stop(f"process {rank()} of {size()} lost contact with the others: one of them stopped or hung "
              f"({(str(error).strip().splitlines() or ['?'])[0][:200]})")
    stop()  # only after a clean end: the process exits anyway after a fault


def check_batch(batch_size, n_images):
    """Each process takes a slice of every step's images: there must be at least one per process (the smallest
    step holds min(batch size, training images)). Every process reaches the same verdict."""
    smallest = min(batch_size, n_images)
    if size() > smallest:
        _stop(f"--batch-size {batch_size} over {size()} processes: each process needs at least one training image per "
              f"step, and a step holds {smallest}; start at most {smallest} processes or raise --batch-size")


def _collective_error(error):
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        sign in text for sign in ("Connection closed", "Connection reset", "Timed out", "timed out", "Broken pipe",
                                  "gloo", "NCCL", "ProcessGroup"))


def _one_line(error):
    if isinstance(error, SystemExit):
        code = error.code
        text = code if isinstance(code, str) else f"exit code {code}"
        return text.removeprefix("error: ").splitlines()[0] if text else "stopped"
    return (f"{type(error).__name__}: {error}".splitlines() or ["?"])[0]


def _stop(message):
    """One line and exit 1, as runs.fail (this module sits below runs and does not import it)."""
    raise SystemExit(f"error: {message}")
