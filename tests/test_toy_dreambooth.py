"""tools/toy_dreambooth.py's data: what it teaches is never what it measures (the full run is a README figure)."""
from dataclasses import replace

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


def test_prompts_name_the_new_kind_as_the_token_before_the_class_word_and_class_prompts_drop_the_token():
    from tools.eval_toy_alignment import name_new_kind
    scene = tool.instance_scenes()[0]
    prompt = tool.prompt_of(scene)
    assert prompt == caption(scene).replace(' bar ', f' {tool.TOKEN} {tool.CLASS_WORD} ')
    assert tool.NEW_KIND not in prompt.split(' ')
    assert parse_caption(name_new_kind(prompt, f'{tool.TOKEN} {tool.CLASS_WORD}', tool.NEW_KIND)) == scene
    square = replace(scene, shapes=(replace(scene.shapes[0], kind=tool.CLASS_WORD),))
    assert tool.class_prompt_of(prompt) == caption(square)  # the same scene with the known kind


def test_without_a_trained_toy_model_it_says_what_to_run(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit, match='run python scripts/quickstart.py first'):
        tool.main(['--base', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


def test_an_out_folder_is_reused_only_for_the_same_inputs(tmp_path):
    import pytest
    out = tmp_path / 'out'
    tool.claim_out_folder(out, {'runs': {'prior': {'optimizer.lr': 2e-4}}})
    (out / 'runs').mkdir()
    tool.claim_out_folder(out, {'runs': {'prior': {'optimizer.lr': 2e-4}}})  # the same inputs: reused
    with pytest.raises(SystemExit, match='made from other inputs'):
        tool.claim_out_folder(out, {'runs': {'prior': {'optimizer.lr': 1e-3}}})
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit, match='not empty'):
        tool.claim_out_folder(foreign, {})
    assert (foreign / 'notes.txt').read_text() == 'mine' and not (foreign / 'inputs.json').exists()
