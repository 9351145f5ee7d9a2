"""Downsampling (issue 17): the timing on a clock the test drives, through a real outbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.outbox import Outbox, PutResult
from edge_agent.downsample import LATE_WINDOW_SECONDS, Downsampler, Throttle, Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_message_goes_at_once_then_one_per_interval() -> None:
    t = Throttle({"pose": 5})
    assert t.offer("pose:a", "pose", 0.0) is False  # a quiet robot: at once
    assert t.offer("pose:a", "pose", 1.0) is True  # inside the interval: held
    assert t.offer("pose:a", "pose", 2.0) is True
    assert t.offer("pose:b", "pose", 2.0) is False  # another robot is its own key
    assert t.next_end() == 5.0
    assert t.ended(4.9) == []
    assert t.ended(5.0) == ["pose:a"]  # released at the end: opens the next interval
    assert t.offer("pose:a", "pose", 6.0) is True
    assert t.ended(10.0) == ["pose:a"]
    # Quiet for longer than an interval: the next one goes at once again.
    assert t.offer("pose:a", "pose", 15.1) is False
    t.prune(100.0)
    assert len(t) == 0


class Site:
    """What the webhook does per callback, and what the downsampler's loop does when it
    wakes, with the clock moved by the test."""

    def __init__(self, box: Outbox, intervals: dict[str, float]) -> None:
        self.box, self.clock = box, Clock()
        self.ds = Downsampler(box, intervals, clock=self.clock)
        self.start = self.clock.now
        self.released_at: list[float] = []

    def advance(self, to: float) -> None:
        """Move the clock to ``start + to``, waking the loop at every end on the way."""
        while (end := self.ds.throttle.next_end()) is not None and end <= self.start + to:
            self.clock.now = end
            self.ds.release_ended()
            self.released_at.append(end - self.start)
        self.clock.now = self.start + to

    async def post(self, channel: str, robot: str, n: int, ts: float) -> PutResult | Verdict:
        """The put's result, or Verdict.SUPERSEDED when nothing was put (as the webhook)."""
        key = f"{channel}:{robot}"
        payload = json.dumps({"n": n, "ts": ts}).encode()
        if not self.ds.applies(channel):
            return await self.box.put(f"{robot}/{channel}", payload)
        verdict = self.ds.offer(key, channel, ts)
        if verdict is Verdict.SUPERSEDED:
            return verdict
        return await self.box.put(f"{robot}/{channel}", payload, compact_key=key,
                                  hold=verdict is Verdict.HOLD, order=ts)

    async def published(self) -> list[tuple[str, int]]:
        await self.box.sync()  # releases are not awaited by the loop
        return [(e.topic, json.loads(e.payload)["n"]) for e in await self.box.peek(0, 10_000)]


async def test_fifty_poses_in_ten_seconds_are_three_messages_ending_with_the_last(
        tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        site = Site(box, {"pose": 5})
        superseded = 0
        for n in range(50):  # every 0.2 s, 50 status changes interleaved
            site.advance(n / 5)
            result = await site.post("pose", "r1", n, ts=n)
            superseded += result is Verdict.SUPERSEDED or (
                isinstance(result, PutResult) and result.superseded)
            await site.post("status", "r1", n, ts=n)
        site.advance(9.8 + 5)  # the last interval ends
        out = await site.published()
    poses = [n for topic, n in out if topic == "r1/pose"]
    # The first at once; the newest of each interval when it ends (24 at 4.8 s, 49 at 9.8 s).
    assert poses == [0, 24, 49]
    assert site.released_at == [5.0, 10.0]  # each held one left when its interval ended
    assert superseded == 47  # 50 in, 3 out: the difference is counted
    assert [n for topic, n in out if topic == "r1/status"] == list(range(50))  # all, in order


async def test_robot_time_decides_the_newest_not_arrival(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        site = Site(box, {"power": 30})
        await site.post("power", "r1", 0, ts=100)
        site.advance(1)
        assert await site.post("power", "r1", 1, ts=105) is PutResult.HELD
        assert await site.post("power", "r1", 2, ts=103) is PutResult.STALE  # delivered late
        site.advance(30)
        assert [n for _, n in await site.published()] == [0, 1]


async def test_a_late_message_older_than_the_published_one_is_superseded(
        tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        site = Site(box, {"pose": 5})
        await site.post("pose", "r1", 0, ts=105)  # a quiet robot: at once
        site.advance(1)
        assert await site.post("pose", "r1", 1, ts=103) is Verdict.SUPERSEDED  # late, older
        assert await site.post("pose", "r1", 2, ts=106) is PutResult.HELD
        site.advance(5)  # released: 106 is now the newest published
        site.advance(6)
        assert await site.post("pose", "r1", 3, ts=105.5) is Verdict.SUPERSEDED
        site.advance(20)
        # The robot's clock went back by more than the window (a reset): not silenced.
        assert await site.post("pose", "r1", 4, ts=106 - LATE_WINDOW_SECONDS - 1) is not (
            Verdict.SUPERSEDED)
        site.advance(40)
        assert [n for _, n in await site.published()] == [0, 2, 4]


async def test_robots_and_channels_are_downsampled_separately(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.db") as box:
        site = Site(box, {"pose": 5, "move": 2})
        for n in range(4):
            site.advance(n)
            for robot in ("r1", "r2"):
                await site.post("pose", robot, n, ts=n)
                await site.post("move", robot, n, ts=n)
                await site.post("event", robot, n, ts=n)
        site.advance(10)
        out = await site.published()
    for robot in ("r1", "r2"):
        assert [n for t, n in out if t == f"{robot}/pose"] == [0, 3]
        assert [n for t, n in out if t == f"{robot}/move"] == [0, 1, 3]  # ends at 2 and 4
        assert [n for t, n in out if t == f"{robot}/event"] == [0, 1, 2, 3]


async def test_a_held_message_survives_the_agent_stopping_inside_its_interval(
        tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with Outbox(path) as box:
        site = Site(box, {"pose": 60})
        await site.post("pose", "r1", 0, ts=0)
        site.advance(1)
        assert await site.post("pose", "r1", 1, ts=1) is PutResult.HELD
        # The agent stops (or dies) here: the interval never ends in this process.
    async with Outbox(path) as box:
        assert await box.release_all() == 1  # what EdgeAgent does on entering
        assert [json.loads(e.payload)["n"] for e in await box.peek(0)] == [0, 1]


@pytest.mark.parametrize("env,problem", [
    ({"MIN_INTERVAL_SECONDS": "status=5"}, "status cannot be downsampled"),
    ({"MIN_INTERVAL_SECONDS": "event=5"}, "event cannot be downsampled"),
    ({"MIN_INTERVAL_SECONDS": "task=5"}, "task cannot be downsampled"),
    ({"MIN_INTERVAL_SECONDS": "pose"}, "expected channel=seconds"),
    ({"MIN_INTERVAL_SECONDS": "pose=-1"}, "between 0 and 86400"),
    ({"FORWARD_CHANNELS": "status,posee"}, "unknown channel(s) posee"),
])
def test_settings_refuse_what_cannot_be_honoured(env: dict[str, str], problem: str) -> None:
    from bridge.errors import ConfigError
    from edge_agent import settings

    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        settings.load(None, {"PUDU_CALLBACK_CODE": "c", **env})


def test_settings_from_the_environment_and_the_file(tmp_path: Path) -> None:
    from edge_agent import settings
    from edge_agent.forwarding import ForwardPolicy

    cfg = tmp_path / "e.yaml"
    cfg.write_text("pudu_callback_code: c\nmin_interval_seconds: {pose: 5, power: 30}\n"
                   "drop_types: [notifyRobotPose]\nforward_channels: [status, event, pose]\n")
    s = settings.load(str(cfg), {})
    policy = ForwardPolicy.of(s)
    assert dict(policy.intervals) == {"pose": 5.0, "power": 30.0}
    assert not policy.forwards("pose", "notifyRobotPose")  # DROP_TYPES, any casing
    assert not policy.forwards("pose", "NOTIFYROBOTPOSE")
    assert not policy.forwards("power", "notifyRobotPower")  # channel left out
    assert policy.forwards("status", "notifyRobotStatus")
    env = settings.load(str(cfg), {"MIN_INTERVAL_SECONDS": "move=2,pose=0", "DROP_TYPES": "",
                                 "FORWARD_CHANNELS": "status event callback"})
    assert dict(ForwardPolicy.of(env).intervals) == {"move": 2.0}  # 0: not downsampled
    assert ForwardPolicy.of(env).forwards("callback/notifySwipeCard", "notifySwipeCard")
