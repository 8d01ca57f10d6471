"""omniflow.delivery: a lossless ipc edge's frames survive its consumer's death; a tcp edge counts what it lost."""
from __future__ import annotations

from omniflow import delivery
from omniflow.delivery import Receiver, Sender
from omniflow.frame import Frame, decode, encode
from omniflow.transport import Link


def frames(n: int) -> list[list[bytes]]:
    return [[bytes(p) for p in encode(Frame(kind="text", seq=i, meta={"text": str(i)}))] for i in range(n)]


def seqs(receiver: Receiver, messages) -> list[int]:
    return [decode(parts).seq for parts in map(receiver.take, messages) if parts is not None]


def test_a_restarted_consumer_gets_every_frame_its_predecessor_had_not_taken_once(tmp_path):
    link = Link("a/out->b/in", "in", f"ipc://{tmp_path}/0.sock")
    first = Receiver(link)                                   # creates the shared ack file
    sender = Sender(link, instance=7)
    sent = [sender.wrap(f) for f in frames(10)]
    assert seqs(first, sent[:3]) == []                       # before the producer's marker: not ours
    assert seqs(first, [*sender.rejoin()[:1], *sent[:4]]) == [0, 1, 2, 3]
    first.close()                                            # killed having taken 4
    second = Receiver(link)
    again = sender.rejoin()                                  # marker + the 6 it had not taken
    assert len(again) == 7
    assert seqs(second, [sent[8], *again, sent[9]]) == [4, 5, 6, 7, 8, 9]   # 9: a duplicate, dropped
    assert second.duplicates == 1 and second.lost == 0 and sender.all_taken()


def test_a_consumer_far_behind_is_told_what_is_no_longer_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "RETAIN_FRAMES", 4)
    link = Link("a/out->b/in", "in", f"ipc://{tmp_path}/0.sock")
    first, sender = Receiver(link), Sender(link, instance=7)
    mark = sender.rejoin()                                   # it connects, then falls behind
    sent = [sender.wrap(f) for f in frames(10)]
    assert seqs(first, [*mark, sent[0]]) == [0]
    assert sender.unprotected == 6                           # 10 sent, 4 kept; 1 was taken later
    again = sender.rejoin()                                  # its successor: 6..10 are kept
    assert seqs(Receiver(link), again) == [6, 7, 8, 9] and sender.lost == 5


def test_a_tcp_edge_counts_the_frames_that_never_arrived():
    link = Link("a/out->b/in", "in", "tcp://127.0.0.1:5999")
    receiver, sender = Receiver(link), Sender(link, instance=7)
    sent = [sender.wrap(f) for f in frames(10)]
    assert sender.rejoin()[1:] == [] and sender.kept == type(sender.kept)()   # nothing kept on tcp
    assert seqs(receiver, [*sent[:3], *sent[6:]]) == [0, 1, 2, 6, 7, 8, 9]
    assert receiver.lost == 3
    renewed = Sender(link, instance=8)                       # a restarted producer numbers afresh
    assert seqs(receiver, [renewed.wrap(f) for f in frames(2)]) == [0, 1] and receiver.lost == 3
