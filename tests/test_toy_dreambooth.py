"""tools/toy_dreambooth.py's data: what it teaches is never what it measures (the full run is a README figure)."""
from diffusion.data.toy_shapes import COLOURS, caption, parse_caption
from tools import toy_dreambooth as tool


def test_instance_images_cover_each_colour_at_each_position_and_evaluation_avoids_them():
    scenes = tool.instance_scenes()
    assert len(scenes) == tool.NUM_INSTANCE
    seen = {(s.shapes[0].colour, s.shapes[0].position) for s in scenes}
    assert seen == {(c, p) for c in tool.INSTANCE_COLOURS for p in tool.INSTANCE_POSITIONS}
    assert {s.shapes[0].size for s in scenes} == {'small', 'large'}
    new_colours = [c for c in COLOURS if c not in tool.INSTANCE_COLOURS]
    evaluation = tool.evaluation_scenes(tool.NEW_KIND, new_colours, seed=1)
    assert len(evaluation) == tool.NUM_EVAL
    assert all(s.shapes[0].colour in new_colours and s.shapes[0].position not in tool.INSTANCE_POSITIONS
               for s in evaluation)
    assert evaluation == tool.evaluation_scenes(tool.NEW_KIND, new_colours, seed=1)


def test_prompts_name_the_new_kind_by_the_token_only():
    scene = tool.instance_scenes()[0]
    prompt = tool.prompt_of(scene)
    assert prompt == caption(scene).replace(' bar ', f' {tool.TOKEN} ')
    assert tool.NEW_KIND not in prompt.split(' ')
    assert parse_caption(prompt.replace(tool.TOKEN, tool.NEW_KIND)) == scene


def test_without_a_trained_toy_model_it_says_what_to_run(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit, match='run python scripts/quickstart.py first'):
        tool.main(['--base', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()
