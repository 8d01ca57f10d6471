"""The delay pattern helpers are inverse, and streaming undelay equals whole-sequence undelay."""
import numpy as np

from omniflow.model import tokens as tk
from omniflow.model.delay import MAX_DELAY, Undelayer, delay, undelay


def frames(n, seed=0):
    return np.random.default_rng(seed).integers(0, tk.AUDIO_CODEBOOK, size=(n, tk.N_AUDIO_LAYERS))


def test_undelay_inverts_delay():
    for n in (0, 1, 5, 33):
        f = frames(n, n)
        assert np.array_equal(undelay(delay(f)), f.reshape(-1, 7))


def test_layer_i_of_frame_f_is_emitted_at_step_f_plus_delay():
    f = frames(4)
    steps = delay(f)  # (F + 8, 7)
    for layer, d in enumerate(tk.DELAYS):
        assert steps[d + 2, layer] == f[2, layer]
        assert steps[d + 4, layer] == tk.EOA
        assert (steps[:d, layer] == tk.PAD_A).all()


def test_streaming_undelayer_equals_undelay_and_stops_on_layer6_eoa():
    f = frames(6, 3)
    steps = delay(f)
    u, got = Undelayer(), []
    for s, row in enumerate(steps):
        new = u.push(row)
        got.extend(new.tolist())
        if len(new):
            assert s == (len(got) - 1) + MAX_DELAY  # frame k completes at step k + 7
    assert got == undelay(steps).tolist() == f.tolist()
    assert u.finished
