from pipeline.ops.dvc_graph import stage_graph


def test_graph_links_stages_through_outs_and_deps_with_foreach_expanded(tmp_path):
    (tmp_path / "params.yaml").write_text("shards: [0, 1]\n")
    (tmp_path / "dvc.yaml").write_text("""
stages:
  a: {cmd: x, outs: [data/raw: {persist: true}]}
  b:
    foreach: ${shards}
    do: {cmd: "x ${item}", deps: [data/raw/sub/file.txt], outs: ["out/b-${item}.parquet"]}
  c: {cmd: x, deps: [out, src/c.py], metrics: [m.json: {cache: false}]}
  d: {cmd: x, deps: [m.json, data/raw]}
""")
    assert stage_graph(tmp_path) == {"a": [], "b@0": ["a"], "b@1": ["a"], "c": ["b@0", "b@1"],
                                     "d": ["a", "c"]}
