from detectors import bench


def test_timed_rounds_rotate_the_method_order(monkeypatch):
    order = []
    step = bench._Subject.step

    def recording_step(self):
        order.append(self.method)
        step(self)
    monkeypatch.setattr(bench._Subject, "step", recording_step)
    results = bench.benchmark("swin_t", ("full", "fixed", "e3va"), size=(64, 64), batch=1, repeats=3)

    timed = order[-9:]
    assert [timed[0:3], timed[3:6], timed[6:9]] == [
        ["full", "fixed", "e3va"], ["fixed", "e3va", "full"], ["e3va", "full", "fixed"]]
    assert [r.method for r in results] == ["full", "fixed", "e3va"]
    assert all(r.step_s > 0 for r in results)
