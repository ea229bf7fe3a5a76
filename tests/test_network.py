
import pytest
import torch
import torch.nn.functional as F

from network import Features, build_network, resnet20, resnet110
from checkpoints import load_network_weights, save_checkpoint, zoo_record
from errors import UserError


@pytest.mark.parametrize('make, blocks', [(resnet20, 3), (resnet110, 18)])
def test_outputs_shapes_and_pre_post_pairs(make, blocks):
    torch.manual_seed(0)
    net = make(num_class=7).train()
    x = torch.randn(2, 3, 32, 32)
    feats = net(x)
    assert isinstance(feats, Features) and len(feats) == 6
    stem, rb1, rb2, rb3, feat, out = feats  # the seed's unpacking still works
    for key in ('stem', 'rb1', 'rb2', 'rb3'):
        pre, post = getattr(feats, key)
        assert tuple(pre.shape[1:]) == net.feature_shapes[key] == tuple(post.shape[1:])
        assert torch.equal(post, F.relu(pre))
        assert (pre < 0).any()  # a real pre-activation, not the post one twice
    assert feat.shape == (2, 64) and out.shape == (2, 7)
    assert torch.allclose(feat, rb3[1].mean(dim=(2, 3)))
    assert torch.allclose(out, net.fc(feat))
    assert net.get_channel_num() == [16, 16, 32, 64, 64, 7]
    names = dict(net.named_parameters())
    assert f'res1.{blocks - 1}.conv2.weight' in names and f'res1.{blocks}.conv1.weight' not in names


def test_parameter_names_match_the_original_zoo():
    keys = set(resnet20(10).state_dict())
    expected = {'conv1.weight', 'bn1.weight', 'bn1.running_mean', 'res1.0.conv1.weight',
                'res1.0.bn1.bias', 'res1.0.conv2.weight', 'res1.0.bn2.running_var',
                'res2.0.ds.0.weight', 'res2.0.ds.1.weight', 'res2.0.ds.1.num_batches_tracked',
                'res3.2.bn2.weight', 'fc.weight', 'fc.bias'}
    assert expected <= keys
    assert not any(k.startswith(('res1.0.ds', 'res2.1.ds')) for k in keys)  # shortcut only on a channel change
    # conv layers: stem + 2 per block + 2 shortcuts
    assert sum(k.endswith('conv1.weight') or k.endswith('conv2.weight') for k in keys) == 1 + 2 * 9


def test_factory():
    assert build_network('resnet110', 100).depth == 110
    with pytest.raises(ValueError, match='resnet20, resnet110'):
        build_network('resnet18', 10)


def test_original_zoo_checkpoint_loads_and_ours_round_trips(tmp_path):
    torch.manual_seed(1)
    src = resnet20(10).eval()
    x = torch.randn(3, 3, 32, 32)
    # The seed saved {'epoch', 'net': DataParallel state dict, 'prec@1', 'prec@5'}.
    zoo = {'epoch': 200, 'net': {'module.' + k: v for k, v in src.state_dict().items()},
           'prec@1': 92.3, 'prec@5': 99.7}
    torch.save(zoo, tmp_path / 'zoo.pth.tar')
    dst = load_network_weights(resnet20(10), str(tmp_path / 'zoo.pth.tar')).eval()
    assert torch.equal(dst(x).out, src(x).out)
    # The seed's KD runs stored the student under 'snet'.
    torch.save({'epoch': 1, 'snet': zoo['net']}, tmp_path / 'kd.pth.tar')
    assert torch.equal(load_network_weights(resnet20(10), str(tmp_path / 'kd.pth.tar')).eval()(x).out,
                       src(x).out)
    # Ours: the same layout, so the seed's load_pretrained_model (key match
    # against a DataParallel model) accepts it too.
    save_checkpoint(zoo_record(dst, 5, 1.0, 2.0), str(tmp_path / 'ours.pth.tar'))
    ours = torch.load(tmp_path / 'ours.pth.tar', weights_only=True)
    assert set(ours['net']) == set(zoo['net']) and ours['epoch'] == 5
    again = load_network_weights(resnet20(10), str(tmp_path / 'ours.pth.tar')).eval()
    assert torch.equal(again(x).out, src(x).out)


def test_mismatched_checkpoints_say_what_differs(tmp_path):
    save_checkpoint(zoo_record(resnet110(10), 0), str(tmp_path / 'r110.pth.tar'))
    with pytest.raises(UserError, match=r'expected resnet20 with 10 classes.*holds resnet110 with 10 classes'):
        load_network_weights(resnet20(10), str(tmp_path / 'r110.pth.tar'), 'teacher')
    save_checkpoint(zoo_record(resnet20(100), 0), str(tmp_path / 'c100.pth.tar'))
    with pytest.raises(UserError, match='holds resnet20 with 100 classes'):
        load_network_weights(resnet20(10), str(tmp_path / 'c100.pth.tar'))
    (tmp_path / 'trunc.pth.tar').write_bytes(open(tmp_path / 'c100.pth.tar', 'rb').read()[:500])
    with pytest.raises(UserError, match='trunc.pth.tar cannot be loaded'):
        load_network_weights(resnet20(10), str(tmp_path / 'trunc.pth.tar'))
    torch.save({'optimizer': {}}, tmp_path / 'foreign.pth.tar')
    with pytest.raises(UserError, match='foreign.pth.tar holds no network weights'):
        load_network_weights(resnet20(10), str(tmp_path / 'foreign.pth.tar'))
    with pytest.raises(UserError, match='does not exist'):
        load_network_weights(resnet20(10), str(tmp_path / 'nope.pth.tar'))
