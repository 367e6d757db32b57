"""TensorFlow/Keras models: image encoders and the LSTM captioner (filled by the captioner issue)."""
