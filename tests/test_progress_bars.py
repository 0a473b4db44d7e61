"""The progress board: one actor for every stage a driver runs on one Ray, a page per stage."""

from __future__ import annotations


def test_one_board_serves_every_stage_and_a_closed_stage_takes_no_more_reports(ray_session):
    import ray

    from mode_ray.console import progress_bars as pb

    def page(board: str) -> dict:
        name, stage = board.split("/", 1)
        return ray.get(ray.get_actor(name, namespace=pb.NAMESPACE).snapshot.remote(stage))

    @ray.remote(num_cpus=0)
    def rows_embedded(board: str, rows: int) -> dict:
        for _ in range(rows):
            pb.report(board, "rows", advance=1)
        return page(board)  # after this worker's own reports: one caller's calls arrive in order

    with pb.progress_bars("first") as first:
        assert ray.get(rows_embedded.remote(first, 3))["rows"]["completed"] == 3
        pb.report(first, "steps", completed=5, total=8, note="loss 1.2")
        with pb.progress_bars("second") as second:
            pb.report(second, "steps", completed=1, total=2)
            assert page(second) == {"steps": {"completed": 1, "total": 2, "note": ""}}
        assert page(first)["steps"] == {"completed": 5, "total": 8, "note": "loss 1.2"}
    assert first.split("/")[0] == second.split("/")[0] and first != second  # one actor, two pages
    pb.report(first, "steps", advance=1)  # late, from a worker still finishing
    assert page(first) == {} and page(second) == {}
