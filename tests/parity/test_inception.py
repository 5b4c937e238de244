"""FID InceptionV3: parity with a PyTorch replica of pytorch-fid's network (random weights), loading errors."""
import numpy as np
import pytest
from harness import need, nhwc, rel_err, to_torch, torch_state_dict

from diffusion_jax.eval.metrics import inception as inc

RTOL = 1e-4  # max |jax - torch| / max |torch|, float32


def _torch_replica():
    """pytorch-fid's FID InceptionV3 (torchvision Inception3 + FIDInceptionA/C/E_1/E_2), same state_dict keys."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=None)  # momentum=None: cumulative average

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin, pf):
            super().__init__()
            self.branch1x1 = Conv(cin, 64, 1)
            self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
            self.branch3x3dbl_3, self.branch_pool = Conv(96, 96, 3, padding=1), Conv(cin, pf, 1)

        def forward(self, x):
            return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              self.branch_pool(avg(x))], 1)

    class B(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = Conv(cin, 384, 3, stride=2)
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

        def forward(self, x):
            d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, 3, stride=2)], 1)

    class C(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            r, c = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
            self.branch1x1 = Conv(cin, 192, 1)
            self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = Conv(cin, c7, 1), Conv(c7, c7, **r), Conv(c7, 192, **c)
            self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **c)
            self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **r), Conv(c7, c7, **c)
            self.branch7x7dbl_5, self.branch_pool = Conv(c7, 192, **r), Conv(cin, 192, 1)

        def forward(self, x):
            d = x
            for i in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{i}")(d)
            return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                              self.branch_pool(avg(x))], 1)

    class D(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
            self.branch7x7x3_1 = Conv(cin, 192, 1)
            self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
            self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
            self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

        def forward(self, x):
            d = x
            for i in range(1, 5):
                d = getattr(self, f"branch7x7x3_{i}")(d)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d, F.max_pool2d(x, 3, stride=2)], 1)

    class E(nn.Module):
        def __init__(self, cin, pool):
            super().__init__()
            self.pool = pool
            self.branch1x1, self.branch3x3_1 = Conv(cin, 320, 1), Conv(cin, 384, 1)
            self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
            self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x):
            b, d = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            p = avg(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
            return torch.cat([self.branch1x1(x), self.branch3x3_2a(b), self.branch3x3_2b(b),
                              self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(p)], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
            self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, padding=1), Conv(64, 80, 1)
            self.Conv2d_4a_3x3 = Conv(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
            self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, "avg"), E(2048, "max")
            self.fc = nn.Linear(2048, 1008)

        def forward(self, x):  # (N, C, H, W) in [-1, 1] -> pool3 (N, 2048), logits (N, 1008); as pytorch-fid
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
            x = F.max_pool2d(x, 3, stride=2)
            for n in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{n}")(x)
            pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return pool3, self.fc(pool3)

    return Net()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(torch replica in eval mode, InceptionFeatures loaded from its saved state_dict)."""
    torch = need("torch")
    torch.manual_seed(0)
    net = _torch_replica()
    with torch.no_grad():  # BN running stats = statistics of random inputs (keeps activations O(1)),
        net.train()(torch.rand(2, 3, 64, 64) * 2 - 1)
        for m in net.modules():  # then random affine parameters so every BN tensor matters
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.7, 1.3)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.add_(0.05 * torch.randn_like(m.running_mean))
        net.fc.weight.mul_(0.02)  # pool3 is O(100) here: keep the logits O(1) so the softmax is not saturated
    path = tmp_path_factory.mktemp("inception") / "fid_inception_random.pth"
    torch.save(net.eval().state_dict(), path)
    return net, inc.load_inception(str(path), batch_size=4)


@pytest.mark.torch
def test_matches_pytorch_replica(pair):
    import torch

    net, ext = pair
    rng = np.random.default_rng(0)
    for shape in [(2, 32, 32, 3), (2, 16, 16, 1)]:  # RGB upsampled, grayscale repeated; one compile (B=2)
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        xt = to_torch(np.repeat(x, 3 // shape[-1], axis=-1), nchw_from_nhwc=True)
        with torch.no_grad():
            pool3, logits = (t.double().numpy() for t in net(xt))
        feats, probs = ext.features(x), ext.probs(x)
        assert feats.shape == (2, 2048) and feats.dtype == np.float64 and probs.shape == (2, 1008)
        err_f, err_p = rel_err(feats, pool3), rel_err(probs, torch.softmax(torch.from_numpy(logits), -1).numpy())
        print(f"{shape}: max rel err pool3 {err_f:.2e}, probs {err_p:.2e}")
        assert err_f < RTOL and err_p < RTOL
        assert np.abs(pool3).max() > 1e-2  # the features are not trivially zero
    assert ext.name == "inception-v3-fid" and ext.num_classes == 1008 and ext.test_accuracy is None
    u8 = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # uint8 is read as [0, 255]; same compile
    np.testing.assert_allclose(ext.features(u8), ext.features(u8 / np.float32(127.5) - 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ext.features(np.full((1, 8, 8, 3), 255.0, np.float32))


@pytest.mark.torch
def test_resize_matches_torch_bilinear():
    need("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    for h, w in [(32, 32), (400, 512), (299, 299)]:  # up, down (no antialias), identity
        x = rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
        ref = nhwc(F.interpolate(to_torch(x, nchw_from_nhwc=True), size=(299, 299), mode="bilinear",
                                 align_corners=False))
        np.testing.assert_allclose(np.asarray(inc.preprocess(x)), ref, atol=1e-5)


def test_missing_file_names_the_weights(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=inc.FID_WEIGHTS_NAME) as e:
        inc.load_inception(str(missing))
    assert str(missing) in str(e.value) and inc.FID_WEIGHTS_URL in str(e.value)
    monkeypatch.setenv(inc.ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        inc.load_inception()


def test_hash_prefix_in_name_is_checked(tmp_path):
    bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="SHA-256"):
        inc.load_inception(str(bad))


def _zero_state_dict():
    from flax import nnx

    _, abstract = nnx.split(nnx.eval_shape(inc.InceptionV3), nnx.Param)
    return torch_state_dict(nnx.to_pure_dict(abstract), inc._torch_key, transposed=lambda keys: True,
                            make=lambda shape: np.zeros(shape, np.float32))


def test_convert_reports_bad_shape_and_keys():
    sd = _zero_state_dict()
    assert "Mixed_7c.branch_pool.bn.running_var" in sd and sd["fc.weight"].shape == (1008, 2048)
    params = inc.convert_state_dict({**sd, "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)})
    assert params["Conv2d_1a_3x3"]["conv"]["weight"].shape == (3, 3, 3, 32)
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight.*\(128, 128, 7, 1\).*\(128, 128, 1, 7\)"):
        inc.convert_state_dict({**sd, "Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 7, 1), np.float32)})
    with pytest.raises(ValueError, match="missing keys.*fc.bias.*unexpected keys.*AuxLogits"):
        inc.convert_state_dict({**{k: v for k, v in sd.items() if k != "fc.bias"}, "AuxLogits.fc.weight": np.zeros(1)})


@pytest.mark.torch
def test_pth_with_wrong_shape_names_the_key(tmp_path):
    torch = need("torch")
    sd = {k: torch.from_numpy(v) for k, v in _zero_state_dict().items()}
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"fc\.weight.*\(1000, 2048\).*\(1008, 2048\)"):
        inc.load_inception(str(tmp_path / "w.pth"))
