// Opens studies in the OHIF viewer in headless Chromium and reports what a reader would see.
//
//   node view.mjs JOB.json
//
// JOB: {base, outDir, chromium, width, height, views: [{name, study, open, kind}]}; `open` picks the
// series thumbnail to double-click ({modality, description}) or is null for the default layout, and
// `kind` (image | SEG | SR) says what to wait for. Each view gets a fresh browser profile and page,
// so one view's state or crash cannot leak into the next. Writes OUT/<name>.png, OUT/<name>.console.txt
// and OUT/report.json (per view: what the viewport and panels show, and every error).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

// ES modules ignore NODE_PATH: load playwright-core from the folder scripts/viewer_setup.sh filled.
const { chromium } = createRequire(path.join(process.env.VIEWER_NODE_MODULES, 'index.js'))('playwright-core');

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const T0 = Date.now();
const log = (...a) => console.log(`[view ${((Date.now() - T0) / 1000).toFixed(1)}s]`, ...a);

const browser = await chromium.launch({
  executablePath: job.chromium,
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-quic',
    // WebGL2 on the CPU (SwiftShader): with --disable-gpu Chromium otherwise offers no WebGL.
    '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist',
  ],
});

async function poll(fn, timeoutMs, everyMs = 200) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn().catch(() => null);
    if (v) return v;
    if (Date.now() > end) return null;
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

async function view(v) {
  // A fresh context is a fresh, throw-away profile (its own user data directory).
  const context = await browser.newContext({ viewport: { width: job.width, height: job.height }, deviceScaleFactor: 1 });
  // The onboarding tour would cover the viewport: mark it as shown already.
  await context.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));
  const page = await context.newPage();
  const lines = [];
  const errors = [];
  const stamp = () => ((Date.now() - T0) / 1000).toFixed(1);
  page.on('console', (m) => {
    const line = `${stamp()} ${m.type()}: ${m.text()}`;
    lines.push(line);
    // OHIF reports a crashed React component with console.debug("... Error Boundary ...").
    if (m.type() === 'error' || /Error Boundary/.test(m.text())) errors.push(line);
  });
  page.on('pageerror', (e) => { const l = `${stamp()} pageerror: ${e.message}`; lines.push(l); errors.push(l); });
  page.on('response', (r) => {
    if (r.status() >= 400) { const l = `${stamp()} http ${r.status()}: ${r.url()}`; lines.push(l); errors.push(l); }
  });
  let inflight = 0, quietSince = Date.now();
  page.on('request', () => { inflight++; quietSince = Date.now(); });
  const settled = () => { inflight = Math.max(0, inflight - 1); quietSince = Date.now(); };
  page.on('requestfinished', settled);
  page.on('requestfailed', settled);
  const networkIdle = (quietMs = 800, maxMs = 30000) =>
    poll(async () => inflight === 0 && Date.now() - quietSince >= quietMs, maxMs, 100);
  const skipTour = async () => {
    // OHIF shows an onboarding tour once per profile; it would cover the viewport.
    const skip = page.getByRole('button', { name: /^Skip/ });
    if (await skip.count() && await skip.first().isVisible()) await skip.first().click().catch(() => {});
  };

  const r = { name: v.name, kind: v.kind, open: v.open };
  const t = Date.now();
  await page.goto(`${job.base}/viewer?StudyInstanceUIDs=${encodeURIComponent(v.study)}`, { waitUntil: 'load' });
  await page.locator('[data-cy="studyBrowser-panel"]').first().waitFor({ state: 'attached', timeout: 30000 }).catch(() => {});
  await page.locator('[data-cy="viewport-pane"] canvas').first().waitFor({ state: 'attached', timeout: 20000 }).catch(() => {});
  await networkIdle();
  await skipTour();
  r.thumbnails = await page.locator('[data-cy^="study-browser-thumbnail"]').evaluateAll((els) =>
    els.map((e) => e.innerText.replace(/\s+/g, ' ').trim()));

  if (v.open) {
    const thumbs = page.locator('[data-cy^="study-browser-thumbnail"]');
    let target = null;
    for (let i = 0; i < await thumbs.count(); i++) {
      const text = (await thumbs.nth(i).innerText()).replace(/\s+/g, ' ');
      if (text.includes(v.open.description) && text.includes(v.open.modality)) { target = thumbs.nth(i); break; }
    }
    r.thumbnailFound = Boolean(target);
    if (target) {
      await target.dblclick();
      await networkIdle();
      if (v.kind === 'SEG') {
        // OHIF asks before it loads a segmentation into the viewport.
        const yes = await poll(async () => {
          const b = page.locator('[data-cy="yes-hydrate-btn"]');
          return (await b.count()) && (await b.first().isVisible()) ? b.first() : null;
        }, 15000);
        r.hydratePrompt = Boolean(yes);
        if (yes) await yes.click();
        await networkIdle();
      }
    }
  }
  await skipTour();
  if (v.kind === 'SR') {
    // OHIF may offer to copy the SR's outlines into its own measurement tracking. A reader who only
    // reads leaves the offer open (answering No would also clear the drawing).
    const prompt = page.getByText('Do you want to continue tracking measurements for this study?');
    r.trackingPrompt = Boolean(await poll(async () => (await prompt.count()) && (await prompt.first().isVisible()), 3000));
  }
  if (v.kind === 'SEG') {
    const panel = page.locator('[data-cy="panelSegmentation-btn"]');
    if (await panel.count()) await panel.first().click().catch(() => {});
  }
  // Wait for what the view is about: segment rows with loading finished, or drawn SR annotations.
  const shown = async () => {
    const s = await viewportState(page);
    const loading = /Loading/i.test(s.viewportText);
    if (v.kind === 'SEG') return s.segmentRows.length > 0 && !loading;
    if (v.kind === 'SR') return s.annotations > 0 && !loading;
    return s.canvases > 0 && !loading;
  };
  r.ready = Boolean(await poll(shown, 30000));
  await networkIdle();
  await page.waitForTimeout(job.settleMs ?? 1500);
  Object.assign(r, await viewportState(page));
  const png = path.join(job.outDir, `${v.name}.png`);
  await page.screenshot({ path: png });
  r.screenshot = png;
  r.viewportBox = await page.locator('[data-cy="viewport-pane"]').first().boundingBox().catch(() => null);
  r.errors = errors;
  r.ms = Date.now() - t;
  fs.writeFileSync(path.join(job.outDir, `${v.name}.console.txt`), lines.join('\n') + '\n');
  await context.close();
  log(`${v.name}: ready=${r.ready} segments=${r.segmentRows.length} svg=${r.svgShapes} errors=${errors.length} ${r.ms} ms`);
  return r;
}

async function viewportState(page) {
  return page.evaluate(() => {
    const text = (e) => (e ? e.innerText.replace(/\s+/g, ' ').trim() : '');
    const panes = [...document.querySelectorAll('[data-cy="viewport-pane"]')];
    const svg = panes.flatMap((p) => [...p.querySelectorAll('svg')]);
    const shapes = svg.flatMap((s) => [...s.querySelectorAll('path, polyline, polygon, line, circle, ellipse, rect')])
      .filter((e) => !e.closest('button'));
    // A label is one <text> whose lines are <tspan>s.
    const texts = svg.flatMap((s) => [...s.querySelectorAll('text')]);
    const lines = (e) => (e.querySelectorAll('tspan').length ? [...e.querySelectorAll('tspan')].map((t) => t.textContent.trim()) : [e.textContent.trim()])
      .filter(Boolean).join('\n');
    const labels = texts.map(lines).filter(Boolean);
    const labelBoxes = texts.filter((e) => lines(e)).map((e) => {
      const b = e.getBoundingClientRect();
      return { text: lines(e), x: b.x, y: b.y, width: b.width, height: b.height };
    });
    const annotations = new Set(svg.flatMap((s) => [...s.querySelectorAll('[data-annotation-uid]')])
      .map((e) => e.getAttribute('data-annotation-uid')));
    const segPanel = document.querySelector('[data-cy="panelSegmentation"]') || document.querySelector('[data-cy="segmentation-panel"]');
    const segmentRows = [...document.querySelectorAll('[data-cy="data-row-title"]')].map(text).filter(Boolean);
    return {
      canvases: panes.reduce((n, p) => n + p.querySelectorAll('canvas').length, 0),
      viewportText: panes.map(text).join(' | '),
      svgShapes: shapes.length,
      annotations: annotations.size,
      svgLabels: labels,
      labelBoxes,
      segmentRows,
      segmentationPanel: text(segPanel),
      somethingWentWrong: /Something went wrong/i.test(document.body.innerText),
    };
  });
}

const report = { base: job.base, views: [] };
let rc = 0;
try {
  for (const v of job.views) {
    let r = await view(v);
    // OHIF 3.13 now and then opens an SR without drawing it (its measurements meet the image's
    // display set in the wrong order; a busy machine makes it likelier). A fresh page is a fair
    // second look; the report keeps the count, and a second miss fails the test.
    if (v.kind === 'SR' && !r.ready) r = { ...(await view(v)), attempts: 2 };
    report.views.push(r);
  }
} catch (e) {
  rc = 2;
  report.harnessError = String(e.stack || e);
  log('harness error', e);
} finally {
  fs.writeFileSync(path.join(job.outDir, 'report.json'), JSON.stringify(report, null, 1));
  await browser.close();
}
process.exit(rc);
