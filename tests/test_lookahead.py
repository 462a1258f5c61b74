"""The meta step's look-ahead steps on fresh training batches (issue #13, bug 3): the KDP loop hands the meta
step ``fresh_batches`` batches of the train split in an order of its own, never the batch it just trained on,
and the count of batches drawn is part of the loop's state, so a resumed run draws the ones it would have."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from lis.data import EpochSampler
from lis.policy import FixedPolicy
from lis.school import KDPSettings, kdp
from test_school import _tiny_school


class Recorder:
    """A meta step that changes nothing and records the batches it is given."""

    fresh_batches = 2

    def __init__(self):
        self.calls = []

    def __call__(self, student, opt, room, admm, signals, batches, meta_batch, device):
        self.calls.append([x.clone() for x, _ in batches])
        return {"meta_loss": 0.0, "meta_ce": 0.0}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _loader(n: int, seed: int, stream: int) -> DataLoader:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1).expand(n, 1, 40).contiguous()
    ds = TensorDataset(x, torch.arange(n) % 10)
    return DataLoader(ds, batch_size=8, sampler=EpochSampler(n, seed, stream=stream))


def test_the_meta_step_looks_ahead_on_fresh_batches_of_their_own_order():
    student, room, groups, admm, _ = _tiny_school()
    train, ahead, meta = _loader(64, 0, 0), _loader(64, 0, 1), _loader(64, 0, 0)
    trained = []
    room_lesson = room.lesson

    def lesson(module, x, y, forward=None, distil=True):
        trained.append(x[:, 0, 0].clone())
        return room_lesson(module, x, y, forward, distil)

    room.lesson = lesson
    recorder = Recorder()
    settings = KDPSettings(epochs=2, lr=0.01, momentum=0.9, weight_decay=0.0, admm_interval=100,
                           signals_interval=100, ema=0.9, meta_interval=3)
    kdp(student, room, groups, admm, FixedPolicy(1.0, 1.0, 0.1), train, [], torch.device("cpu"), settings,
        lambda record: None, meta_step=recorder, meta_batches=meta, ahead_batches=ahead)
    assert len(recorder.calls) == 16 // 3
    drawn = [b[:, 0, 0] for call in recorder.calls for b in call]
    assert len(drawn) == 2 * len(recorder.calls)
    # the look-ahead order is the ahead loader's own, batch after batch across epochs
    again = _loader(64, 0, 1)
    expected = [x[:, 0, 0] for epoch in range(2) for x, _ in again][:len(drawn)]
    assert all(torch.equal(d, e) for d, e in zip(drawn, expected))
    # never the batch the student was just trained on (the one before each meta step)
    for k, call in enumerate(recorder.calls):
        just_trained = trained[3 * (k + 1) - 1]
        assert not any(torch.equal(b[:, 0, 0], just_trained) for b in call)


def test_another_stream_is_another_order_and_stream_zero_is_unchanged():
    base, other = EpochSampler(100, seed=3), EpochSampler(100, seed=3, stream=1)
    assert sorted(other.order(0)) == list(range(100))
    assert other.order(0) != base.order(0)
    assert other.order(0) == EpochSampler(100, seed=3, stream=1).order(0)
    # stream 0 keeps the order runs had before streams existed: (seed, epoch) through SeedSequence
    import numpy as np
    seed = int(np.random.SeedSequence([3, 0]).generate_state(1)[0])
    assert base.order(0) == torch.randperm(100, generator=torch.Generator().manual_seed(seed)).tolist()
