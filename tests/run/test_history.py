"""History (run.history): the callback that writes history.csv."""

import lightning as L


def test_testing_an_earlier_checkpoint_keeps_every_epochs_history(data_dir, tmp_path):
    """Lightning restores the callbacks of the checkpoint a test loads; History keeps the rows
    of the fit (metrics.json's per-epoch timings once lost the epochs after the best one)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vae_lightning.data import MNISTDataModule
    from vae_lightning.models import VAE
    from vae_lightning.run.history import History
    from vae_lightning.training import AutomaticStep

    history = History(tmp_path / "history.csv")
    every = ModelCheckpoint(dirpath=tmp_path, filename="e{epoch}", save_top_k=-1,
                            monitor="val/loss")  # fmt: skip
    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=2, limit_val_batches=1, callbacks=[history, every],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = AutomaticStep().bind(VAE(latent_dim=2, hidden_dim=8))
    data = MNISTDataModule(data_dir=str(data_dir), verify=False, download=False, val_size=128)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, ckpt_path=tmp_path / "eepoch=0.ckpt", verbose=False)
    assert [row["epoch"] for row in history.rows] == [0, 1, 2]
