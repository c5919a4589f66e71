from medift.train import DescriptionSamples, epoch_batches


class _Samples(DescriptionSamples):
    def __init__(self, descriptions, shuffle, seed=1):
        self.descriptions, self.shuffle, self.seed = descriptions, shuffle, seed

    def response(self, index, load_count):
        return super().response(self.descriptions[index], index, load_count)


DESC = "small cell size, round cell shape, low nuclear cytoplasmic ratio, granularity, Neutrophil"


def test_response_shuffling_permutes_phrases_and_differs_between_loads():
    samples = _Samples([DESC], shuffle=True)
    responses = {samples.response(0, load) for load in range(1, 20)}
    assert len(responses) > 5
    for r in responses:
        assert sorted(r.split(", ")) == sorted(DESC.split(", "))


def test_response_shuffling_is_deterministic_for_a_seed():
    assert _Samples([DESC], True).response(0, 3) == _Samples([DESC], True).response(0, 3)
    assert _Samples([DESC], True, seed=1).response(0, 3) != _Samples([DESC], True, seed=2).response(0, 3)


def test_no_shuffle_keeps_the_description():
    assert _Samples([DESC], shuffle=False).response(0, 7) == DESC


def test_epoch_batches_cover_every_sample_repeat_times():
    batches = epoch_batches(10, 4, repeat=3, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(list(range(10)) * 3)
    assert batches == epoch_batches(10, 4, repeat=3, seed=1, epoch=0)
    assert batches != epoch_batches(10, 4, repeat=3, seed=1, epoch=1)
