"""A short soak (bench/soak.py) against the shared TorchServe: every malformed request a 4xx,
no 5xx, every finished stream exactly as long as asked, and no KV block held afterwards."""
from bench.soak import soak


def test_short_soak_leaks_nothing(server):
    report = soak(server, requests_n=160, concurrency=16, malformed_frac=0.1,
                  disconnect_frac=0.3, max_tokens=(4, 24), time_limit_s=300, seed=13)
    print(report)
    assert report.not_sent == 0 and report.failures == {}
    assert report.malformed > 0 and report.malformed_4xx == report.malformed
    assert report.status_5xx == 0 and report.status_4xx == report.malformed
    assert report.greedy > 0 and report.sampled > 0 and report.disconnected > 0
    assert report.completed + report.disconnected == report.greedy + report.sampled
    assert report.exact_length == report.completed
    assert report.blocks_held_after == 0 and report.streams_left_after == 0
