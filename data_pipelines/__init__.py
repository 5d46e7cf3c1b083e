"""Input data for multi-task dense prediction: NYUD-v2 and PASCAL-Context, knowing nothing of models.

  config.py          get_dataset_config("nyud" | "pascal"): the dataset settings (config.dataset)
  pipeline.py        create_train_dataset / create_eval_dataset / num_examples (grain)
  builders.py        tensorflow-datasets builders nyud_v2_mt, pascal_context_mt (array_record)
  nyud.py, pascal_context.py   readers of the published NYUD_MT / PASCAL_MT folders
  transforms.py      augmentations and preprocessing (numpy)
  normalization.py   the ImageNet mean and std (importable without grain or tfds)
  synthetic.py       synthetic folders in the published layouts (`python -m data_pipelines.synthetic`)
"""
