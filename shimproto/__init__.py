"""What shimd and its shims both speak: ttrpc framing, the task API messages and their codec, idmap
helpers, and where a pod's shim listens.

A leaf package: it imports neither shimd nor shims (tests/unit/test_import_graph.py), and, because
every shim process loads it, nothing heavier than the standard library's small modules
(tests/unit/test_shim_codec.py::test_shim_process_imports_stay_light).
"""
