"""The plain way a user converts an image folder to TFRecords, the baseline of the data-path benchmarks."""

from __future__ import annotations

import os


def plain_loop(data_dir: str, out_file: str) -> int:
    """What a user writes from TensorFlow's TFRecord tutorial: one thread, original bytes stored."""
    import tensorflow as tf

    def bytes_feature(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def int64_feature(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    count = 0
    classes = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    with tf.io.TFRecordWriter(out_file) as writer:
        for label, name in enumerate(classes):
            for file_name in sorted(os.listdir(os.path.join(data_dir, name))):
                with open(os.path.join(data_dir, name, file_name), "rb") as f:
                    data = f.read()
                tf.io.decode_image(data, channels=3, expand_animations=False)  # raises if corrupt
                feature = {"image/encoded": bytes_feature(data), "label": int64_feature(label),
                           "path": bytes_feature(f"{name}/{file_name}".encode())}
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
                count += 1
    return count
