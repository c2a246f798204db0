"""tools/eval_toy_alignment.py: scoring generated toy images against their prompts, and its input errors."""
import json

import pytest

from diffusion.data.toy_shapes import Scene, Shape, caption, render_scene, sample_scene, write_toy_dataset
from tools import eval_toy_alignment as tool


def write_generated(folder, scenes_and_prompts):
    """A folder like scripts/inference.py writes: images rendered from `scene`, listed with `prompt`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / 'metadata.jsonl', 'w') as meta:
        for i, (scene, prompt) in enumerate(scenes_and_prompts):
            name = f'{i:04d}_x_s{i}.png'
            render_scene(scene, 64).save(folder / name)
            meta.write(json.dumps({'file': name, 'prompt': prompt, 'seed': i}) + '\n')


def test_scores_count_each_attribute_of_each_described_shape(tmp_path, capsys):
    right = Scene('gray', (Shape('red', 'circle', 'large', 'left'), Shape('blue', 'square', 'small', 'top right')))
    wrong_colour = Scene('white', (Shape('green', 'triangle', 'large', 'bottom'),))
    asked_colour = Scene('white', (Shape('yellow', 'triangle', 'large', 'bottom'),))
    wrong_place = Scene('black', (Shape('purple', 'circle', 'small', 'center'),))
    asked_place = Scene('black', (Shape('purple', 'circle', 'small', 'top'),))
    write_generated(tmp_path / 'gen', [(right, caption(right)), (wrong_colour, caption(asked_colour)),
                                       (wrong_place, caption(asked_place))])
    tool.main([str(tmp_path / 'gen'), '--json', str(tmp_path / 'report.json')])
    report = json.loads((tmp_path / 'report.json').read_text())
    scores = report['all_shapes']
    # 4 described shapes: 3 in place (the moved one has no blob in its cell), 2 of them the right colour
    assert scores['position'] == pytest.approx(3 / 4) and scores['colour'] == pytest.approx(2 / 4)
    assert scores['kind'] == pytest.approx(3 / 4) and scores['all'] == pytest.approx(2 / 4)
    assert scores['background'] == 1 and scores['count'] == 1
    assert report['held_out_pairs'] is None and report['num_images'] == 3
    assert report['images'][1]['read'] == caption(wrong_colour)
    table = capsys.readouterr().out
    assert '3 images' in table and 'colour' in table and '0.50' in table


def test_the_kind_confusion_says_what_each_described_kind_was_read_as(tmp_path, capsys):
    drawn = Scene('gray', (Shape('red', 'square', 'large', 'left'), Shape('blue', 'circle', 'small', 'right')))
    asked = Scene('gray', (Shape('red', 'circle', 'large', 'left'), Shape('blue', 'circle', 'small', 'right')))
    moved = Scene('white', (Shape('green', 'triangle', 'small', 'center'),))
    asked_moved = Scene('white', (Shape('green', 'triangle', 'small', 'top'),))
    write_generated(tmp_path / 'gen', [(drawn, caption(asked)), (moved, caption(asked_moved))])
    tool.main([str(tmp_path / 'gen'), '--json', str(tmp_path / 'report.json')])
    confusion = json.loads((tmp_path / 'report.json').read_text())['kind_confusion']
    assert list(confusion) == ['circle', 'triangle']  # kinds no prompt describes are left out
    assert confusion['circle']['read'] == {'circle': 1, 'square': 1, 'triangle': 0, 'missing': 0}
    assert confusion['circle']['by_size']['large'] == {'circle': 0, 'square': 1, 'triangle': 0, 'missing': 0}
    assert confusion['triangle']['read']['missing'] == 1  # no blob in the described cell
    out = capsys.readouterr().out
    assert 'circle (2): right 0.50 (small 1.00, large 0.00); read as circle 1, square 1' in out


def test_a_dataset_split_scores_its_own_images_and_the_held_out_pairs(tmp_path, capsys):
    write_toy_dataset(tmp_path / 'toy', num_train=2, num_val=2, num_unseen=12, progress=False)
    tool.main(['--data', str(tmp_path / 'toy'), '--split', 'unseen', '--json', str(tmp_path / 'r.json')])
    report = json.loads((tmp_path / 'r.json').read_text())
    assert report['num_images'] == 12
    assert report['all_shapes']['all'] >= 0.9 and report['held_out_pairs']['all'] >= 0.9
    assert report['mask_iou'] == {'images': 12, 'mean': 1.0}  # each render against its own record's masks
    assert 'held-out pairs' in capsys.readouterr().out


def test_bad_inputs_name_the_file_and_line(tmp_path):
    with pytest.raises(SystemExit, match='metadata.jsonl not found'):
        tool.main([str(tmp_path)])
    scene = Scene('gray', (Shape('red', 'circle', 'large', 'left'),))
    write_generated(tmp_path / 'gen', [(scene, caption(scene)), (scene, 'a photo of a cat')])
    with pytest.raises(SystemExit, match=r'metadata.jsonl line 2: not a toy-shapes caption'):
        tool.main([str(tmp_path / 'gen')])
    write_generated(tmp_path / 'gone', [(scene, caption(scene))])
    (tmp_path / 'gone' / '0000_x_s0.png').unlink()
    with pytest.raises(SystemExit, match=r'line 1: cannot read image .*0000_x_s0.png'):
        tool.main([str(tmp_path / 'gone')])
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'metadata.jsonl').write_text('{"file": "a.png"}\n')
    with pytest.raises(SystemExit, match=r'line 1: expected a JSON object with "file" and "prompt"'):
        tool.main([str(tmp_path / 'broken')])
    with pytest.raises(SystemExit):
        tool.main([])  # neither a folder nor --split


@pytest.mark.parametrize('phrase', ['sks', 'sks square'])
def test_a_new_kind_is_scored_under_its_word_or_phrase(tmp_path, phrase):
    folder = tmp_path / 'bars'
    folder.mkdir()
    scenes = [Scene('gray', (Shape('green', 'bar', 'large', 'left'),)),
              Scene('white', (Shape('yellow', 'bar', 'small', 'top right'),)),
              Scene('black', (Shape('purple', 'circle', 'large', 'center'),))]  # drawn as a circle: wrong kind
    lines = []
    for i, scene in enumerate(scenes):
        render_scene(scene, 64).save(folder / f'{i}.png')
        shown = scene if i < 2 else Scene('black', (Shape('purple', 'bar', 'large', 'center'),))
        prompt = ' '.join(phrase if w == 'bar' else w for w in caption(shown).split(' '))
        lines.append(json.dumps({'file': f'{i}.png', 'prompt': prompt}))
    (folder / 'metadata.jsonl').write_text('\n'.join(lines) + '\n')
    report = tool.evaluate(tool.read_generated(folder), new_kind=tool.new_kind_argument(f'{phrase}=bar'))
    assert report['all_shapes']['kind'] == pytest.approx(2 / 3) and report['all_shapes']['colour'] == 1
    with pytest.raises(tool.EvalError, match='not a toy-shapes caption'):
        tool.evaluate(tool.read_generated(folder))  # the token means nothing without it
    for bad in ('sks=star', 'sks  square=bar', '=bar', 'sks'):
        with pytest.raises(SystemExit):
            tool.parse_args([str(folder), '--new-kind', bad])


def test_a_new_kind_phrase_is_replaced_as_whole_words_only():
    assert tool.name_new_kind('a large red sks square on the left', 'sks square', 'bar') == \
        'a large red bar on the left'
    assert tool.name_new_kind('a large red sks squares', 'sks square', 'bar') == 'a large red sks squares'
    assert tool.name_new_kind('sks square at the top', 'sks square', 'bar') == 'bar at the top'


def test_controlled_images_get_the_mask_iou_with_their_control_record_s_shapes(tmp_path, capsys):
    toy = tmp_path / 'toy'
    write_toy_dataset(toy, num_train=2, num_val=6, num_unseen=2, progress=False)
    records = json.loads((toy / 'partition' / 'val_info.json').read_text())
    folder = tmp_path / 'gen'
    folder.mkdir()
    with open(folder / 'metadata.jsonl', 'w') as meta:
        for i in range(6):  # images 0-2 show their control record; 3-5 show another record than their control
            shown = i if i < 3 else (i + 1) % 6
            scene, rng = sample_scene(0, 'val', shown)
            render_scene(scene, 64, rng).save(folder / f'{i}.png')
            meta.write(json.dumps({'file': f'{i}.png', 'prompt': records[i]['prompt'],
                                   'control_image': str(toy / 'images' / records[i]['path'])}) + '\n')
        meta.write(json.dumps({'file': '0.png', 'prompt': records[0]['prompt'],
                               'control_image': str(tmp_path / 'elsewhere.png')}) + '\n')  # not a record: no IoU
    tool.main([str(folder), '--data', str(toy), '--json', str(tmp_path / 'r.json')])
    report = json.loads((tmp_path / 'r.json').read_text())
    ious = [image.get('mask_iou') for image in report['images']]
    assert ious[:3] == [1.0, 1.0, 1.0] and max(ious[3:6]) < 0.5 and ious[6] is None
    assert report['mask_iou']['images'] == 6 and report['mask_iou']['mean'] == pytest.approx(sum(ious[:6]) / 6)
    assert "mask IoU with the control records' shapes" in capsys.readouterr().out
    tool.main([str(folder)])  # without --data: no ground truth, no IoU
    assert 'mask IoU' not in capsys.readouterr().out
