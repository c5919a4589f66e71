import pytest

from medift import mcq
from medift.chat import IGNORE_INDEX, encode_conversation, model_inputs
from medift.embedded.llava import EmbeddedModelConfig, build_processor


@pytest.fixture(scope="module")
def processor():
    return build_processor(EmbeddedModelConfig())


def test_mcq_instruction_is_the_papers_template():
    text = mcq.build_mcq_instruction("What is the cell size?", ["big", "small"])
    assert text == (
        "What is the cell size?\nA. big\nB. small\n"
        'Response with only the letter of the correct choice, starting with "The correct answer is [A or B]".'
    )


@pytest.mark.parametrize(
    "output,n,expected",
    [
        ("The correct answer is B.", 2, "B"),
        ("The correct answer is [C]", 4, "C"),
        ("The correct answer is *A*.", 3, "A"),
        ("the correct answer is d", 5, "D"),
        ("The correct answer is E.", 4, None),  # not a valid letter for 4 options
        ("The correct answer is Because", 4, None),  # no substring matching
        ("B", 4, None),  # no prefix: unparseable, counted as wrong
        ("", 2, None),
    ],
)
def test_parse_answer_letter(output, n, expected):
    assert mcq.parse_answer_letter(output, n) == expected


def test_format_answer_round_trips_through_the_parser():
    for i in range(6):
        assert mcq.parse_answer_letter(mcq.format_answer(i), 6) == mcq.LETTERS[i]


def test_loss_is_on_responses_only(processor):
    encoded = encode_conversation(
        processor,
        ["What is the color?", "Describe this image."],
        ["The correct answer is B.", "big size, red color"],
        with_image=True,
    )
    tok = processor.tokenizer
    supervised = [
        tok.convert_ids_to_tokens(i) for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX
    ]
    assert supervised[:6] == ["The", "correct", "answer", "is", "B.", "</s>"]  # the default: letter-dot tokens
    assert "big" in supervised and "What" not in supervised and "<image>" not in supervised
    assert encoded.input_ids.count(tok.convert_tokens_to_ids("<image>")) == 1  # the processor expands it
    from PIL import Image

    batch = model_inputs(processor, [encoded], [Image.new("RGB", (64, 64))])
    assert batch["input_ids"][0].tolist().count(tok.convert_tokens_to_ids("<image>")) == 64
    carried = [
        tok.convert_ids_to_tokens(int(i))
        for i, label in zip(batch["input_ids"][0], batch["labels"][0])
        if label != IGNORE_INDEX
    ]
    assert carried == supervised


def test_every_medical_word_is_in_the_embedded_vocabulary(processor):
    from medift.datasets import DATASETS
    from medift.embedded.llava import EMBEDDED_DATASETS

    tok = processor.tokenizer
    for module in (DATASETS[name] for name in EMBEDDED_DATASETS):
        for key, values in module.ATTRIBUTES.items():
            for text in (module.QUESTION_TEXT[key], *values):
                assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text


def test_left_padding_keeps_prompts_flush_right(processor):
    """Generation and scoring pad on the left (model_inputs, padding_side="left"): every row ends at the last
    column, so the next token follows each prompt, and each row's labels end there too."""
    from PIL import Image

    short = encode_conversation(processor, ["What is the color?"], ["red"], with_image=True)
    long = encode_conversation(processor, ["What is the color?\nA. red\nB. blue"], ["blue color"], with_image=True)
    images = [Image.new("RGB", (64, 64))] * 2
    batch = model_inputs(processor, [short, long], images, padding_side="left")
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1, 0] == 1
    for row, encoded in enumerate((short, long)):
        n = len(encoded.labels)
        assert batch["labels"][row, -n:].tolist() == encoded.labels
        response = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
        assert batch["input_ids"][row, response - n :].tolist() == encoded.input_ids[response:]  # after the image


def test_letter_dot_tokens_put_the_letter_right_before_its_option():
    from medift.generation import forced_answer_context

    processor = build_processor(EmbeddedModelConfig(letter_dot_tokens=True))
    tokenizer = processor.tokenizer
    prompt = mcq.build_mcq_instruction("What is the color?", ["red", "light blue"])
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(prompt + "\n" + mcq.format_answer(1))["input_ids"])
    assert pieces[5:11] == ["\n", "A.", "red", "\n", "B.", "light blue"]
    assert pieces[-1] == "B."  # the answer ends in the option's own token
    assert "[ A or B ]" in tokenizer.decode(tokenizer(prompt)["input_ids"])  # bare letters stay letters
    assert tokenizer.convert_ids_to_tokens(tokenizer("USER: A.b US.")["input_ids"]) == [
        "USER",
        ":",
        "A",
        ".",
        "<unk>",
        "<unk>",
        ".",
    ]
    decoded = tokenizer.decode(tokenizer(mcq.format_answer(2))["input_ids"])
    assert mcq.parse_answer_letter(decoded, 3) == "C"
    _, letter_ids = forced_answer_context(processor, 5)
    assert tokenizer.convert_ids_to_tokens(list(letter_ids.values())) == ["A.", "B.", "C.", "D.", "E."]


def test_without_letter_dot_tokens_the_letter_and_stop_are_two_tokens():
    processor = build_processor(EmbeddedModelConfig(letter_dot_tokens=False))
    pieces = processor.tokenizer.tokenize(mcq.format_answer(0))
    assert pieces[-2:] == ["A", "."]


def test_labels_that_do_not_line_up_with_the_processors_ids_are_an_error(processor):
    from PIL import Image

    encoded = encode_conversation(processor, ["What is the color?"], ["red"], with_image=True)
    encoded.input_ids[-2] = processor.tokenizer.convert_tokens_to_ids("blue")  # no longer the text's tokens
    with pytest.raises(ValueError, match="row 0: the processor's token ids do not extend the chat's tokenization"):
        model_inputs(processor, [encoded], [Image.new("RGB", (64, 64))])
    with pytest.raises(ValueError, match="every row needs its image"):
        model_inputs(processor, [encoded], [None])
