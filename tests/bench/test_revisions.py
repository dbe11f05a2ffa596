"""bench.revisions reads the headline numbers back from both revisions' reports alike."""

from bench.revisions import headline

OLD_LOAD = """## Worker (generation through the compose cluster)

| clients | requests ok | tokens/s | vs 1 client |
| ---: | ---: | ---: | ---: |
| 1 | 3 | 3.2 | 1.00x |
| 2 | 6 | 4.7 | 1.47x |
"""

NEW_LOAD = """## Worker (generation through the compose cluster): gRPC and the HTTP API

| round | API | clients | tokens/s | vs 1 client |
| ---: | ---: | ---: | ---: | ---: |
| 1 | gRPC | 1 | 5.2 | 1.00x |
| 1 | HTTP | 1 | 5.3 | 1.00x |
| 2 | HTTP | 1 | 4.4 | 1.00x |
| 2 | gRPC | 1 | 4.5 | 1.00x |
| 3 | gRPC | 1 | 6.0 | 1.00x |
"""


def test_old_and_new_load_reports_give_the_same_labels():
    assert headline("load-worker", OLD_LOAD) == {
        "Worker (generation through the compose cluster): 1 (gRPC)": 3.2,
        "Worker (generation through the compose cluster): 2 (gRPC)": 4.7,
    }
    assert headline("load-worker", NEW_LOAD) == {  # medians over the report's own rounds
        "Worker (generation through the compose cluster): 1 (gRPC)": 5.2,
        "Worker (generation through the compose cluster): 1 (HTTP)": 4.85,
    }


def test_offload_rows_are_keyed_by_section_and_store():
    report = """## 2048 tokens of context

| store | decode ms/token (median) | pages moved |
| --- | ---: | ---: |
| in-process | 148.9 | 12 |
| remote shm | 169.3 ms | 12 |
"""
    assert headline("offload", report) == {
        "2048 tokens of context: in-process": 148.9,
        "2048 tokens of context: remote shm": 169.3,
    }
