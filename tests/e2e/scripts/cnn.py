# CNN: conv, batchnorm, max/avg pooling, dropout, SGD with momentum.
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
X = torch.randn(32, 3, 16, 16)
Y = torch.randint(0, 10, (32,))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.c1(x))), 2)
        x = F.avg_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(self.drop(x.flatten(1)))


model = Net().to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
Xd, Yd = X.to(device), Y.to(device)
# The device's generator is its own (as on a real GPU): seed it where dropout starts.
torch.manual_seed(1)
for _ in range(10):
    opt.zero_grad()
    loss = F.cross_entropy(model(Xd), Yd)
    loss.backward()
    opt.step()
print("final", repr(loss.item()))
model.eval()
print((model(Xd).argmax(1) == Yd).float().mean().item())
