"""A plain PyTorch training script, written the way users write them (after pytorch/examples' MNIST):
its own conv net with dropout, Adadelta, StepLR per epoch, nll_loss, a random augmentation,
train and test DataLoaders with worker processes, and an evaluation after every epoch.

The data is scikit-learn's bundled 8x8 digits (nothing is downloaded).
See train_digits_reprokit.py for the same script with reprokit added.
"""

import argparse

import reprokit
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2


class Digits(Dataset):
    def __init__(self, train, transform=None):
        bunch = load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(bunch.target)
        cut = int(len(x) * 0.8)
        self.x, self.y = (x[:cut], y[:cut]) if train else (x[cut:], y[cut:])
        self.transform = transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[i]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, padding=1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def train(args, model, train_loader, optimizer, epoch, run):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        run.step(loss=loss)
        if batch_idx % args.log_interval == 0:
            seen = batch_idx * len(data)
            print(f"epoch {epoch} [{seen}/{len(train_loader.dataset)}] loss {loss.item():.4f}")


def test(model, test_loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            correct += model(data).argmax(dim=1).eq(target).sum().item()
    return correct / len(test_loader.dataset)


def main():
    parser = argparse.ArgumentParser(description="digits example")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--save-model", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    run = reprokit.Run("runs/digits", seed=args.seed, config=vars(args), checkpoint_every=10)

    augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1))
    train_loader = DataLoader(Digits(True, augment), batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers)
    test_loader = DataLoader(Digits(False), batch_size=256, num_workers=args.workers)

    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    run.track(model=model, optimizer=optimizer, scheduler=scheduler)
    train_loader = run.loader(train_loader)
    for epoch in run.epochs(args.epochs, start=1):
        train(args, model, train_loader, optimizer, epoch, run)
        acc = test(model, test_loader)
        print(f"epoch {epoch}: test accuracy {acc:.4f}")
        run.log(test_accuracy=acc)
        scheduler.step()
    run.finish(test_accuracy=acc)
    if args.save_model:
        torch.save(model.state_dict(), "digits_cnn.pt")


if __name__ == "__main__":
    main()
