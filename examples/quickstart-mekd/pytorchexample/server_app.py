"""pytorchexample: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from mekd_fl.teacher import TeacherOracle
from pytorchexample.task import Net
from strategies import MEKD

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    # Load global model
    arrays = ArrayRecord(Net().state_dict())

    # Initialize the strategy and start it
    teacher = torch.export.load(context.run_config["teacher"]).module()
    oracle = TeacherOracle(teacher, num_classes=10, image_shape=(1, 28, 28))
    strategy = MEKD(oracle, strategy=FedAvg(fraction_train=fraction_train))
    result = strategy.start(
        grid=grid, initial_arrays=arrays, train_config=ConfigRecord({"lr": lr}), num_rounds=num_rounds
    )

    # Save final model to disk
    print("\nSaving final model to disk...")
    torch.save(result.arrays.to_torch_state_dict(), context.run_config["model-path"])
