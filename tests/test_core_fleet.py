"""The agents as admins see them (dutserver/core/fleet.py), in-process on fakes."""

from __future__ import annotations

from pathlib import Path

from core_support import ADDRESS, poll, spin, start_node, submit


async def test_online_status_follows_the_polls(tmp_path: Path) -> None:
    node = await start_node(tmp_path, agents=("agent1", "agent2"), online_grace_s=5.0)
    fleet = node.services.fleet
    assert (await fleet.online()) == {"agent1": False, "agent2": False}
    answers, gone = poll(node, "agent1")
    assert (await fleet.online()) == {"agent1": True, "agent2": False}
    gone.hang_up()  # a poll that was dropped does not keep its agent online
    await spin()
    assert answers.got == [None]
    assert (await fleet.online()) == {"agent1": False, "agent2": False}
    poll(node, "agent2")
    node.clock.advance(node.settings.poll_timeout_s + 4.9)
    assert (await fleet.online())["agent2"]
    node.clock.advance(0.2)
    assert not (await fleet.online())["agent2"]


async def test_an_inventory_result_shows_in_the_agents_status(tmp_path: Path) -> None:
    node = await start_node(tmp_path)
    task = await submit(node, {"type": "inventory"})
    poll(node)
    await spin()
    await node.tasks.result("agent1", ADDRESS, "1.2.3", task.id, {"os": "Linux", "cpus": 8})
    status = await node.services.fleet.status("agent1")
    assert status["inventory"] == {"os": "Linux", "cpus": 8}
    assert status["agent_version"] == "1.2.3" and status["address"] == ADDRESS
    assert status["online"]
