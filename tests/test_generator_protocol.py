"""The generator protocol's modality: image generators render through to_images, text generators' samples are
their UTF-8 bytes (decoded by to_texts), and CheckedGenerator holds each to its modality."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _toy import ToyGenerator

from pejax.errors import GeneratorError
from pejax.generators import MODALITIES
from pejax.generators import CheckedGenerator
from pejax.generators import Generator
from pejax.generators import ImageGenerator
from pejax.generators import TextGenerator
from pejax.generators.text_codec import encode_texts

WORDS = ("cat", "dog", "héllo", "")


class WordsGenerator:
    """A text generator: random picks words; variation repeats each word round(degree) + 1 times."""

    name = "words"
    modality = "text"

    def random(self, key, label, num_samples):
        idx = np.asarray(jax.random.randint(jax.random.fold_in(key, label), (num_samples,), 0, 4))
        return encode_texts([WORDS[i] for i in idx], max_bytes=32)

    def variation(self, key, samples, label, degree):
        texts = self.to_texts(samples)
        return encode_texts([" ".join([t] * (round(degree) + 1)) for t in texts], max_bytes=32)

    def to_texts(self, samples):
        return [bytes(row).rstrip(b"\0").decode("utf-8") for row in np.asarray(samples)]


def test_protocols_tell_the_modalities_apart():
    assert MODALITIES == ("image", "text")
    image, text = ToyGenerator(), WordsGenerator()
    assert isinstance(image, Generator) and isinstance(image, ImageGenerator)
    assert not isinstance(image, TextGenerator)
    assert isinstance(text, Generator) and isinstance(text, TextGenerator)
    assert not isinstance(text, ImageGenerator)


def test_text_samples_are_rendered_as_their_bytes():
    gen = CheckedGenerator(WordsGenerator())
    assert gen.modality == "text"
    samples = gen.random(jax.random.key(0), 0, 5)
    rendered = gen.render(samples)
    assert rendered.dtype == jnp.uint8 and rendered.shape == (5, 32)
    np.testing.assert_array_equal(np.asarray(rendered), np.asarray(samples))
    texts = gen.texts(samples)
    assert len(texts) == 5 and set(texts) <= set(WORDS)
    varied = gen.variation(jax.random.key(1), samples, 0, 1.0)
    assert gen.texts(varied) == [" ".join([t, t]) for t in texts]
    with pytest.raises(TypeError, match=r"modality 'text'.*no images"):
        gen.images(samples)


def test_image_generators_render_through_to_images():
    toy = ToyGenerator()
    gen = CheckedGenerator(toy)
    samples = gen.random(jax.random.key(0), 1, 3)
    images = gen.render(samples)
    assert images.shape == (3, 6, 6, 1) and toy.calls["to_images"] == 1
    with pytest.raises(TypeError, match=r"not text"):
        gen.text_bytes(samples)


def test_a_generator_without_modality_is_an_image_generator():
    class Legacy:
        name = "legacy"

        def random(self, key, label, n):
            return jnp.zeros((n, 2, 2, 1))

        def variation(self, key, samples, label, degree):
            return samples

        def to_images(self, samples):
            return samples

    gen = CheckedGenerator(Legacy())
    assert gen.modality == "image"
    assert gen.render(gen.random(jax.random.key(0), 0, 2)).shape == (2, 2, 2, 1)


def test_each_modality_needs_its_own_method():
    class TextWithoutDecoder(WordsGenerator):
        to_texts = None

    with pytest.raises(TypeError, match=r"has no method to_texts\(\).*text generator"):
        CheckedGenerator(TextWithoutDecoder())

    class ImageWithoutRender:
        name = "no-render"
        modality = "image"

        def random(self, key, label, n):
            return jnp.zeros((n, 2, 2, 1))

        def variation(self, key, samples, label, degree):
            return samples

    with pytest.raises(TypeError, match=r"has no method to_images\(\).*image generator"):
        CheckedGenerator(ImageWithoutRender())

    class Audio(WordsGenerator):
        modality = "audio"

    with pytest.raises(ValueError, match=r"modality 'audio'; pejax knows \('image', 'text'\)"):
        CheckedGenerator(Audio())


def test_malformed_text_output_is_a_clear_error():
    class FloatText(WordsGenerator):
        def random(self, key, label, num_samples):
            return jnp.zeros((num_samples, 8), jnp.float32)

    gen = CheckedGenerator(FloatText())
    with pytest.raises(GeneratorError, match=r"uint8 array \(N, L\) of UTF-8 bytes"):
        gen.render(gen.random(jax.random.key(0), 0, 2))

    class ShortDecoder(WordsGenerator):
        def to_texts(self, samples):
            return super().to_texts(samples)[:-1]

    gen = CheckedGenerator(ShortDecoder())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(GeneratorError, match=r"to_texts must return a list of 3 strings"):
            gen.texts(gen.random(jax.random.key(0), 0, 3))
