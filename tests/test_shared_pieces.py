"""dqn.py and dqn_atari.py are written apart (each self-contained), but the pieces they both need are the same
text, and this test keeps them so: a fix made to one file's copy alone fails here."""

import ast

import pytest

from script_runner import REPO

SHARED = ["ConfigError", "TrainingDiverged", "linear_schedule", "epsilon_greedy", "make_run_dir", "seed_everything",
          "start_tracking", "td_update", "weights_not_finite", "checksum", "save_atomically", "verified"]


def top_level_definitions(script: str) -> dict:
    source = (REPO / script).read_text()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", SHARED)
def test_dqn_and_dqn_atari_share_the_piece_verbatim(name):
    classic, atari = top_level_definitions("dqn.py"), top_level_definitions("dqn_atari.py")
    assert classic[name] == atari[name], f"{name} differs between dqn.py and dqn_atari.py"
