"""Jobs: batch inference, feature extraction, fine-tuning, evaluation."""
